"""`python -m trainer`: see trainer/train.py. Says which extra to install instead of an ImportError."""

import sys

from agent.extras import MissingExtra, require

try:
    require("learn", "python -m trainer")
except MissingExtra as exc:
    print(f"trainer: {exc}", file=sys.stderr)
    sys.exit(2)

from trainer.train import main

sys.exit(main())
