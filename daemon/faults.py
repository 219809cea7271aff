"""Deterministic fault injection: a named fault at a named fragment and round.

Multi-peer tests start a daemon with ``--fault KIND:fragment=P,round=R`` (hidden from
``--help``) so that a fault happens exactly where the test wants it, never "after a sleep
and hope". Kinds:

* ``stall-send`` — while sending its contribution to other reducers, the peer stops after
  the first chunk and never finishes (a peer that hangs mid-round).
* ``corrupt-send`` — the peer flips bytes in every chunk it sends to other reducers.
* ``exit-in-round`` — the process dies (``os._exit(137)``, like SIGKILL) after sending the
  first chunk of the round.
* ``perturb-global`` — after applying the round, the peer adds noise to its copy of the
  fragment's global parameters (a diverged copy, to be repaired: I3).
* ``slow-step:seconds=S`` — every inner step takes S seconds longer (a slower machine).
* ``exit-serving:chunks=N`` — the process dies right after serving its N-th state chunk
  (a donor lost mid-download).
* ``exit-at-step:step=S,rank=R`` — rank R of the site (0 by default) dies like SIGKILL
  after inner step S, once per state dir (a marker file remembers it, so the restarted
  site runs on).

``round`` may be ``*`` for every round; ``fragment`` likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = (
    "stall-send",
    "corrupt-send",
    "exit-in-round",
    "perturb-global",
    "slow-step",
    "exit-serving",
    "exit-at-step",
)


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    fragment: int | None
    round: int | None
    seconds: float = 0.0
    chunks: int | None = None
    step: int | None = None
    rank: int = 0

    def matches(self, kind: str, fragment: int, round_index: int) -> bool:
        return (
            self.kind == kind
            and (self.fragment is None or self.fragment == fragment)
            and (self.round is None or self.round == round_index)
        )


def parse_fault(text: str) -> Fault:
    """'stall-send:fragment=1,round=2' → Fault; ValueError saying what is wrong."""
    kind, _, spec = text.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown fault {kind!r}; kinds: {', '.join(KINDS)}")
    where: dict[str, int | None] = {"fragment": None, "round": None}
    seconds = 0.0
    numbers: dict[str, int] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key in ("seconds", "chunks", "step", "rank"):
            try:
                seconds = float(value) if key == "seconds" else seconds
                if key != "seconds":
                    numbers[key] = int(value)
            except ValueError:
                raise ValueError(f"fault {text!r}: {key} must be a number") from None
            continue
        if key not in where:
            raise ValueError(
                f"fault {text!r}: unknown field {key!r} "
                "(fragment, round, seconds, chunks, step, rank)"
            )
        try:
            where[key] = None if value == "*" else int(value)
        except ValueError:
            raise ValueError(f"fault {text!r}: {key} must be an integer or *") from None
    if kind == "exit-at-step" and "step" not in numbers:
        raise ValueError(f"fault {text!r}: exit-at-step needs step=S")
    return Fault(
        kind,
        where["fragment"],
        where["round"],
        seconds,
        numbers.get("chunks"),
        numbers.get("step"),
        numbers.get("rank", 0),
    )


@dataclass(frozen=True, slots=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()

    @classmethod
    def parse(cls, texts: tuple[str, ...]) -> FaultPlan:
        return cls(tuple(parse_fault(t) for t in texts))

    def active(self, kind: str, fragment: int, round_index: int) -> bool:
        return any(f.matches(kind, fragment, round_index) for f in self.faults)

    def exit_after_chunks(self) -> int | None:
        """Serve this many state chunks, then die at the next request (``exit-serving``)."""
        counts = [f.chunks for f in self.faults if f.kind == "exit-serving"]
        return min((c or 0 for c in counts), default=None)

    def exits_at(self, rank: int, step: int) -> bool:
        """True if rank ``rank`` is to die after inner step ``step`` (``exit-at-step``)."""
        return any(
            f.kind == "exit-at-step" and f.step == step and f.rank == rank for f in self.faults
        )

    def step_delay_s(self) -> float:
        """Extra seconds per inner step (``slow-step``)."""
        return sum(f.seconds for f in self.faults if f.kind == "slow-step")
