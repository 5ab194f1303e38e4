"""ShadowSync: synchronise model replicas across Horovod ranks in the background.

Generic (knows nothing about robots). Public API:

- `ShadowSync(model, algorithm="ma"|"easgd"|"bmuf", ...)`: shadow-thread sync,
  a context manager with `.tick()` and `.stats`;
- `ForegroundSync(model, algorithm, every=k)`: the FR-* counterparts;
- `Hogwild(model, lr, on_step=...)`: lock-free worker threads on one replica;
- `shadowsync.rules`: the update rules as pure functions.

Horovod is imported only when a synchroniser starts.
"""

from shadowsync.comm import SyncTimeout
from shadowsync.foreground import ForegroundSync
from shadowsync.hogwild import Hogwild, HogwildStats
from shadowsync.rules import ALGORITHMS, make_rule
from shadowsync.shadow import ShadowSync
from shadowsync.stats import SyncStats

__all__ = [
    "ALGORITHMS",
    "ForegroundSync",
    "Hogwild",
    "HogwildStats",
    "ShadowSync",
    "SyncStats",
    "SyncTimeout",
    "make_rule",
]
