"""Fault injection: ``qadapter train`` killed at chosen points, including inside a save,
with SIGKILL, SIGINT and SIGTERM, then resumed. Every case checks that the final adapter equals an
uninterrupted run's bit for bit, that no folder named as a checkpoint is ever incomplete, and that
nothing is left behind. ``python3 tests/kill_loop.py`` runs the same check at random kill points.
"""
import pytest

from kill_suite import kill_and_resume, make_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("faults"))


# Each point in the order an uninterrupted run reaches it (fault_runner.py): per checkpoint, torch.save
# writes the optimizer, scheduler and RNG states; safetensors the adapter; os.rename publishes it.
@pytest.mark.parametrize("spec", [
    "INT@load:1",       # Ctrl-C while starting: it stops before training, writes nothing, and the rerun trains
    "TERM@load:1",      # the same for SIGTERM
    "KILL@write:1",     # inside the first checkpoint's optimizer.pt (half written): nothing to resume yet
    "KILL@tensors:2",   # inside the second checkpoint's adapter file: resume from checkpoint-2
    "KILL@replace:8",   # inside the final adapter's save
    "INT@step:3",       # Ctrl-C: a checkpoint at step 3, the resume command printed
    "TERM@write:4",     # SIGTERM inside a save: the save completes, then a checkpoint, then exit
    "INT@replace:9",    # Ctrl-C at the very end (the run record): "interrupted", with the resume command
])
def test_killed_run_resumes_to_the_same_adapter(setup, tmp_path, spec):
    kill_and_resume(setup, tmp_path, spec)
