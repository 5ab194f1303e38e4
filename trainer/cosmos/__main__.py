"""`python -m trainer.cosmos sft|grpo`: see trainer/cosmos/train.py. Says which extras to install
instead of an ImportError."""

import sys

from agent.extras import MissingExtra, require

try:
    require("learn", "python -m trainer.cosmos")
    require("cosmos", "python -m trainer.cosmos")
except MissingExtra as exc:
    print(f"trainer.cosmos: {exc}", file=sys.stderr)
    sys.exit(2)

from trainer.cosmos.train import main

sys.exit(main())
