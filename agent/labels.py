"""Which recorded decisions are a teacher's, named once: the runtime writes it, learners read it.

A step's `decided_by` column (docs/episodes.md) says who acted:

| `decided_by` | who acted | a label? |
|---|---|---|
| a name in `TEACHERS` (`oracle`, `cosmos`) | that backend, serving alone | yes |
| `teacher:<backend>` | the `--teacher`, picked by DAgger's mixing (`--beta`) | yes |
| `escalated:<backend>` | the `--teacher`, because the student was unsure (`--escalate-below`) | yes |
| anything else (`policy`, `onnx`, `zero`, a fallback) | not a teacher | no |

Besides the executed decision, a step may carry the teacher's own label
(`teacher_*` columns) whoever acted; learners prefer it. The writers are
`agent.backends.teaching.Teaching` (through `acted`) and the server, which
fills in a lone backend's name. A new backend whose decisions are to teach
when it serves alone is named in `TEACHERS` (a test checks every name there
is a registered backend).
"""

from __future__ import annotations

TEACHERS = frozenset({"oracle", "cosmos"})  # backends whose decisions are labels
MIXED, ESCALATED = "teacher", "escalated"  # the prefixes of a teacher acting for a student


def acted(teacher: str, escalated: bool) -> str:
    """`decided_by` of a teacher's decision executed in a student's place."""
    return f"{ESCALATED if escalated else MIXED}:{teacher}"


def is_teacher(decided_by: str | None, backend: str | None) -> bool:
    """Whether an executed decision is a teacher's (so a label).

    Files of format 1 have no `decided_by`: the episode's backend decided every step.
    """
    if decided_by is None:
        return backend in TEACHERS
    kind, sep, _ = decided_by.partition(":")
    if sep:
        return kind in (MIXED, ESCALATED)
    return decided_by in TEACHERS
