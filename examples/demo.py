"""`make demo`: the project's main job on the embedded default, end to end.

Runs each stage that exists and prints its results.
"""

from __future__ import annotations

import sys

from agent.doctor import report


def main() -> int:
    print("== installation ==")
    return report()


if __name__ == "__main__":
    sys.exit(main())
