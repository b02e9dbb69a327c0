"""`deal_batches`: batches dealt round-robin to ranks, gathered round by round, are every rank's rows in the batches'
order, as one process computes them, with the same number of forwards on every rank. Ranks are simulated by threads
whose `gather` stands for an all-gather."""

import threading
from collections.abc import Callable

import pytest
import torch

from hf_sara.distributed import deal_batches


def run_on_ranks(num_processes: int, work: Callable[[int, Callable], object]) -> list:
    """
    Runs `work(process_index, gather)` on `num_processes` threads, `gather` all-gathering along dim 0 in rank order
    (refusing tensors of different shapes, as a real all-gather does), and returns each thread's result.
    """
    barrier = threading.Barrier(num_processes)
    slots: list[torch.Tensor | None] = [None] * num_processes
    results: list = [None] * num_processes
    errors: list[BaseException] = []

    def gather_of(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def gather(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor
            barrier.wait()
            shapes = {slot.shape for slot in slots}
            assert len(shapes) == 1, f"an all-gather needs the same shape on every rank, got {shapes}"
            gathered = torch.cat(slots)
            barrier.wait()  # every rank has read the slots before any writes the next ones
            return gathered

        return gather

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank, gather_of(rank))
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(num_processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def rows_of(batch_rows: list[int]) -> list[range]:
    starts = [sum(batch_rows[:batch]) for batch in range(len(batch_rows))]
    return [range(start, start + rows) for start, rows in zip(starts, batch_rows, strict=True)]


@pytest.mark.parametrize("batch_rows", [[], [3], [4, 4, 2], [4, 4, 4, 1, 4, 3]])  # the last: two tables' batches
@pytest.mark.parametrize("num_processes", [1, 2, 3, 4])
def test_every_rank_gets_every_row_in_order_round_by_round(batch_rows, num_processes):
    rows = rows_of(batch_rows)

    def work(rank, gather):
        computed = []

        def compute(batch):
            computed.append(batch)
            ids = torch.tensor(rows[batch], dtype=torch.long)
            return ids, torch.stack([ids.float(), torch.full((len(ids),), float(rank))], dim=1)

        rounds = list(deal_batches(batch_rows, compute, rank, num_processes, gather if num_processes > 1 else None))
        return computed, rounds

    results = run_on_ranks(num_processes, work)
    every_row = list(range(sum(batch_rows)))
    forwards = {len(computed) for computed, _ in results}
    assert forwards == {-(-len(batch_rows) // num_processes)}  # the same number on every rank
    for rank, (_, rounds) in enumerate(results):
        assert [batch for round_ in rounds for batch in round_.batches] == list(range(len(batch_rows)))
        ids = [id_ for round_ in rounds for id_ in round_.values[0].tolist()]
        assert ids == every_row  # in the batches' order, the padding and the batches run twice dropped
        for round_ in rounds:
            expected = [row for batch in round_.batches for row in rows[batch]]
            assert round_.values[0].tolist() == expected == round_.values[1][:, 0].tolist()
            # Each row comes from the rank its batch was dealt to.
            dealt_to = [batch % num_processes for batch in round_.batches for _ in rows[batch]]
            assert round_.values[1][:, 1].tolist() == [float(owner) for owner in dealt_to]
        mine = [len(rows[batch]) for batch in range(rank, len(batch_rows), num_processes)]
        assert [round_.computed for round_ in rounds] == mine + [0] * (len(rounds) - len(mine))
    assert sum(round_.computed for _, rounds in results for round_ in rounds) == len(every_row)


def test_refusals():
    with pytest.raises(ValueError, match="needs a `gather`"):
        list(deal_batches([2], lambda batch: (torch.zeros(2),), 0, 2))
    with pytest.raises(RuntimeError, match="Batch 0 has 2 rows"):
        list(deal_batches([2], lambda batch: (torch.zeros(3),)))
