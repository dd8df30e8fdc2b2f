"""A damaged newest checkpoint never blocks a workdir: each way of damaging its files is found
(checksums, or for steps saved without them the restore itself), the step is set aside as
<step>.damaged with one warning naming it, and the newest intact step restores."""
import collections
import errno
import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd135m.checkpoints import orbax_io
from amd135m.errors import UserError
from amd135m.training import loop

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(step: int) -> dict:
  weights = jnp.arange(64 * 256, dtype=jnp.float32).reshape(64, 256) / 1000 + step
  return {"params": {"w": jax.device_put(weights, SHARDING)},
          "step": jax.device_put(jnp.int32(step), SHARDING)}


ABSTRACT = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SHARDING),
                        _state(0))


def _save_steps(workdir, steps=(1, 2)):
  ckpt = orbax_io.TrainCheckpoints(workdir)
  for step in steps:
    ckpt.save(step, _state(step), {"position": step}, {"note": "test"})
  ckpt.close()
  return pathlib.Path(workdir) / orbax_io.CHECKPOINT_DIR


def _restore_newest(workdir, abstract=ABSTRACT):
  warnings = []
  ckpt = orbax_io.TrainCheckpoints(workdir)
  try:
    return ckpt.restore_newest(abstract, loop._non_finite, warnings.append), warnings
  finally:
    ckpt.close()


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  path.write_bytes(bytes(data))


DAMAGES = {
    "truncated data file": lambda d: _largest_data_file(d).write_bytes(
        _largest_data_file(d).read_bytes()[:100]),
    "removed manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "removed state": lambda d: shutil.rmtree(d / "state"),
    "emptied step metadata": lambda d: (d / "_CHECKPOINT_METADATA").write_text(""),
    "emptied state metadata": lambda d: (d / "state" / "_METADATA").write_text(""),
    "zeroed data files": lambda d: [p.write_bytes(bytes(p.stat().st_size))
                                    for p in (d / "state").rglob("d/*")],
}


@pytest.mark.parametrize("sealed", [True, False], ids=["checksummed", "saved_before_checksums"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_step_is_set_aside_and_the_previous_one_restores(tmp_path, damage,
                                                                          sealed):
  directory = _save_steps(tmp_path)
  assert (directory / "2" / orbax_io.CHECKSUM_FILE).is_file()  # written once the save completed
  if not sealed:  # as checkpoints written before this change
    for step in (1, 2):
      (directory / str(step) / orbax_io.CHECKSUM_FILE).unlink()
  DAMAGES[damage](directory / "2")

  (step, state, data_state, meta), warnings = _restore_newest(tmp_path)
  assert step == 1 and data_state == {"position": 1} and meta == {"note": "test"}
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  assert len(warnings) == 1 and warnings[0].startswith("checkpoint step 2 is damaged ("), warnings
  assert f"set it aside as {directory / '2.damaged'} " in warnings[0], warnings
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2.damaged"]
  # The next run finds nothing to warn about.
  assert _restore_newest(tmp_path)[0][0] == 1 and _restore_newest(tmp_path)[1] == []


def test_flipped_bytes_are_caught_by_the_checksum_not_by_a_nan_loss(tmp_path):
  directory = _save_steps(tmp_path)
  _flip(_largest_data_file(directory / "2"))
  (step, _, _, _), warnings = _restore_newest(tmp_path)
  assert step == 1
  assert "differs from its checksum" in warnings[0], warnings


def test_non_finite_weights_in_a_step_without_checksums_are_damage(tmp_path):
  """Bytes flipped into NaN in a step saved before checksums: found by the restored values."""
  ckpt = orbax_io.TrainCheckpoints(tmp_path)
  ckpt.save(1, _state(1), {}, {})
  broken = _state(2)
  broken["params"]["w"] = broken["params"]["w"].at[3, 5].set(jnp.nan)
  ckpt.save(2, broken, {}, {})
  ckpt.close()
  (tmp_path / "checkpoints" / "2" / orbax_io.CHECKSUM_FILE).unlink()
  (step, _, _, _), warnings = _restore_newest(tmp_path)
  assert step == 1
  assert warnings == [f"checkpoint step 2 is damaged (['params']['w'] holds NaN or infinity); "
                      f"set it aside as {tmp_path / 'checkpoints' / '2.damaged'} and resuming "
                      "from the newest intact step"]


def test_steps_saved_before_checksums_restore(tmp_path):
  directory = _save_steps(tmp_path)
  for step in (1, 2):
    (directory / str(step) / orbax_io.CHECKSUM_FILE).unlink()
  (step, state, _, _), warnings = _restore_newest(tmp_path)
  assert step == 2 and warnings == []
  np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])


def test_no_step_restoring_sets_nothing_aside_and_says_why(tmp_path):
  """Every step failing the same way is this run's settings (here another shape), not damage:
  nothing is moved, and the error says what to do."""
  directory = _save_steps(tmp_path)
  other = jax.tree.map(lambda a: a, ABSTRACT)
  other["params"]["w"] = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=SHARDING)
  with pytest.raises(UserError, match=r"^no checkpoint in .* restores; the newest, step 2: it "
                     r"does not restore: .* If model or optimizer settings changed"):
    _restore_newest(tmp_path, other)
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_every_step_damaged_is_one_error_after_setting_them_aside(tmp_path):
  directory = _save_steps(tmp_path)
  for step in (1, 2):
    _flip(_largest_data_file(directory / str(step)))
  with pytest.raises(UserError, match="is damaged .*rerun to start from the beginning"):
    _restore_newest(tmp_path)
  assert sorted(p.name for p in directory.iterdir()) == ["1.damaged", "2.damaged"]


def test_the_checksum_file_lists_every_file_of_the_step(tmp_path):
  directory = _save_steps(tmp_path, steps=(1,))
  listed = json.loads((directory / "1" / orbax_io.CHECKSUM_FILE).read_text())["sha256"]
  on_disk = {p.relative_to(directory / "1").as_posix() for p in (directory / "1").rglob("*")
             if p.is_file() and p.name != orbax_io.CHECKSUM_FILE}
  assert set(listed) == on_disk and "state/manifest.ocdbt" in on_disk


def test_a_full_disk_before_a_save_writes_nothing_and_names_the_last_good_step(tmp_path,
                                                                              monkeypatch):
  ckpt = orbax_io.TrainCheckpoints(tmp_path)
  ckpt.save(1, _state(1), {"position": 1}, {})
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(orbax_io.shutil, "disk_usage", lambda path: usage(2**30, 2**30, 0))
  with pytest.raises(orbax_io.DiskFull) as error:
    ckpt.save(2, _state(2), {"position": 2}, {})
  ckpt.close()
  assert re.fullmatch(
      re.escape(f"no space left on device at {tmp_path / 'checkpoints'}; step 2 not written (")
      + r"\d+\.\d MiB needed, 0\.0 MiB free" + re.escape(
          "); the last good checkpoint is step 1: free some space (or move --workdir to a larger "
          "disk) and rerun"), str(error.value)), str(error.value)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_a_full_disk_during_a_save_leaves_nothing_half_written(tmp_path, monkeypatch):
  """The write fails in orbax's background thread (here: the data item's JSON): the step's
  temporary directory is removed, never listed, and the last good step restores."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  handler = ocp.handlers.JsonCheckpointHandler
  write = handler._save_fn

  async def disk_full_at_step_2(self, item, directory):
    if item == {"position": 2}:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await write(self, item, directory)
  monkeypatch.setattr(handler, "_save_fn", disk_full_at_step_2)
  ckpt = orbax_io.TrainCheckpoints(tmp_path)
  ckpt.save(1, _state(1), {"position": 1}, {})
  with pytest.raises(orbax_io.DiskFull) as error:
    ckpt.save(2, _state(2), {"position": 2}, {})
    ckpt.wait()  # async: the failure shows when the save is waited for
  ckpt.close()
  assert str(error.value) == (
      f"no space left on device at {tmp_path / 'checkpoints'}; step 2 not written; the last good "
      "checkpoint is step 1: free some space (or move --workdir to a larger disk) and rerun")
  assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]
  monkeypatch.undo()
  assert _restore_newest(tmp_path)[0][0] == 1
  # The trainer's next run (it holds the workdir) removes the half-written step.
  ckpt = orbax_io.TrainCheckpoints(tmp_path, cleanup=True)
  ckpt.save(3, _state(3), {"position": 3}, {})
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "3"]


def test_cleanup_is_done_when_opened_so_a_run_that_stops_before_saving_exits_clean(tmp_path):
  # Orbax cleans up in a thread it waits for only at the first save: a run that stopped with a
  # one-line error before saving left the leftovers and died under the thread at exit ("cannot
  # schedule new futures after interpreter shutdown", a traceback after the error line).
  leftovers = [tmp_path / "checkpoints" / f"{i}.orbax-checkpoint-tmp-{i}" for i in range(200)]
  for path in leftovers:
    path.mkdir(parents=True)
  script = ("import sys; from amd135m.checkpoints import orbax_io; "
            "orbax_io.TrainCheckpoints(sys.argv[1], cleanup=True).close()")
  run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
  assert not any(path.exists() for path in leftovers)
