"""A random-schedule model of gluon_pingpong.py's barrier protocol: mbarrier waits that see only a phase's parity,
one producer filling a ring of stages in tile order, two consumers taking the tiles in turn. It checks that no
schedule deadlocks, that each consumer reads the (tile, K step) it expects, and that the producer never refills a
stage whose MMA may still be reading it. Without the turn barriers, or with each stage released one step early,
most schedules fail.

    python3 benchmarks/results/h200-2026-12-05/scripts/gluon_pingpong_model.py
"""
import random


class Barrier:
    """An mbarrier: a phase completes when `count` arrivals have come; wait(parity) passes once the phase of that
    parity has completed, i.e. while the current phase's parity differs."""

    def __init__(self, count):
        self.count, self.pending, self.completed = count, count, 0

    def arrive(self):
        self.pending -= 1
        if self.pending == 0:
            self.completed += 1
            self.pending = self.count

    def passes(self, parity):
        return (self.completed & 1) != parity


def run(num_tiles, k_steps, stages, seed):
    """The errors of one random interleaving (an empty list when it is correct)."""
    rng = random.Random(seed)
    ready = [Barrier(1) for _ in range(stages)]  # a_ready and b_ready together
    empty = [Barrier(1) for _ in range(stages)]
    turn = [Barrier(1), Barrier(1)]
    stage, in_use, errors = [None] * stages, [False] * stages, []

    def producer():
        it = 0
        for tile in range(num_tiles):
            for k in range(k_steps):
                s = it % stages
                while not empty[s].passes(((it // stages) & 1) ^ 1):
                    yield
                if in_use[s]:
                    errors.append(f"stage {s} refilled under an MMA (tile {tile}, k {k})")
                stage[s] = (tile, k)
                yield
                ready[s].arrive()
                it += 1
                yield

    def consumer(c):
        j = 0
        for tile in range(c, num_tiles, 2):
            while not turn[c].passes((j & 1) ^ 1 if c == 0 else j & 1):
                yield
            it = (2 * j + c) * k_steps
            for k in range(k_steps):
                s = it % stages
                while not ready[s].passes((it // stages) & 1):
                    yield
                if stage[s] != (tile, k):
                    errors.append(f"consumer {c} read {stage[s]} for {(tile, k)}")
                in_use[s] = True  # this step's MMA is in flight; the previous one has completed
                yield
                if k > 0:
                    previous = (it + stages - 1) % stages
                    in_use[previous] = False
                    empty[previous].arrive()
                it += 1
                yield
            last = (it + stages - 1) % stages
            in_use[last] = False
            empty[last].arrive()
            turn[1 - c].arrive()
            yield  # the epilogue
            j += 1

    def state():
        return tuple(b.completed for b in ready + empty + turn), tuple(map(str, stage))

    alive, unchanged = [producer(), consumer(0), consumer(1)], 0
    while alive:
        actor, before = rng.choice(alive), state()
        try:
            next(actor)
        except StopIteration:
            alive.remove(actor)
            unchanged = 0
            continue
        unchanged = unchanged + 1 if state() == before else 0
        if unchanged > 2000:
            return errors + ["deadlock"]
    return errors


if __name__ == "__main__":
    failed = 0
    for seed in range(4000):
        shape = random.Random(seed)
        errors = run(shape.randint(0, 9), shape.randint(1, 6), shape.randint(3, 5), seed)
        failed += bool(errors)
        if errors and failed <= 5:
            print(seed, errors[:3])
    print(f"schedules with errors: {failed} of 4000")
