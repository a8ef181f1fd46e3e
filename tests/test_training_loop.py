"""The training scaffold without Ray: a run stopped after a checkpoint and resumed from it continues
exactly as the uninterrupted run (same losses, same data order mid-epoch, same random draws)."""
from pathlib import Path

import pytest
import torch

from pipeline.device import Backend
from pipeline.train.loop import TrainingLoop
from pipeline.train.state import TrainState, load_state, save_state

CPU = Backend("cpu", torch.device("cpu"))
BATCHES_PER_EPOCH = 3


def epoch_batches(epoch: int):
    """A different order every epoch, fixed by the epoch alone (as a seeded shuffle is)."""
    generator = torch.Generator().manual_seed(1000 + epoch)
    data = torch.randn(BATCHES_PER_EPOCH, 8, 3, generator=generator)
    return iter(list(data))


class Crash(RuntimeError):
    pass


def train(steps: int, checkpoints: Path, crash_after: int | None = None, resume: bool = False,
          restore_rng: bool = True) -> dict[int, float]:
    """Losses by step. Checkpoints every 2 steps into numbered folders; `resume` starts from the newest."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = TrainState(model=model, optimizer=optimizer, counters={"draws": 0})
    if resume:
        newest = max(checkpoints.iterdir(), key=lambda p: int(p.name))
        saved = load_state(newest)
        if not restore_rng:
            saved["rng"] = [{**saved["rng"][0], "torch": torch.get_rng_state()}]
        state.load_state_dict(saved, rank=0)

    def sink(metrics, saved_state):
        save_state(checkpoints / str(int(metrics["step"])), saved_state)

    run = TrainingLoop("toy", state, steps, rank=0, world=1, backend=CPU, save_checkpoint=sink)
    losses = {}
    for batch in run.batches(epoch_batches, "the toy needs a batch"):
        noise = torch.randn(batch.shape[0], 1)  # a random draw per step: only a restored RNG repeats it
        loss = (model(batch) - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state.counters["draws"] += 1
        run.step_done(batch.shape[0])
        losses[run.step] = float(loss.detach())
        run.checkpoint_if_due(2)
        if crash_after is not None and run.step == crash_after:
            raise Crash
    assert state.counters["draws"] == steps
    return losses


def test_resumed_run_follows_the_uninterrupted_trajectory(tmp_path):
    straight = train(10, tmp_path / "a")
    with pytest.raises(Crash):
        train(10, tmp_path / "b", crash_after=9)  # newest checkpoint: step 8, mid-epoch (epoch 2, batch 2 of 3)
    assert sorted(int(p.name) for p in (tmp_path / "b").iterdir()) == [2, 4, 6, 8]
    resumed = train(10, tmp_path / "b", resume=True)
    assert resumed == {step: straight[step] for step in (9, 10)}


def test_the_comparison_sees_a_lost_random_state(tmp_path):
    """The same resume without the checkpoint's RNG draws other noise, and the losses part ways: the test
    above would catch a scaffold that forgot it."""
    straight = train(10, tmp_path / "a")
    with pytest.raises(Crash):
        train(10, tmp_path / "b", crash_after=9)
    resumed = train(10, tmp_path / "b", resume=True, restore_rng=False)
    assert sorted(resumed) == [9, 10] and resumed != {step: straight[step] for step in (9, 10)}


def test_a_resume_at_an_epoch_end_moves_on_and_an_empty_epoch_is_named(tmp_path):
    straight = train(10, tmp_path / "a")
    with pytest.raises(Crash):
        train(10, tmp_path / "c", crash_after=7)  # newest checkpoint: step 6, the last batch of epoch 1
    resumed = train(10, tmp_path / "c", resume=True)
    assert resumed == {step: straight[step] for step in range(7, 11)}

    run = TrainingLoop("toy", TrainState(), 5, rank=0, world=1, backend=CPU, save_checkpoint=lambda m, s: None)
    with pytest.raises(ValueError, match="no full toy step: the split needs 8 images"):
        next(run.batches(lambda epoch: iter([]), "the split needs 8 images"))
