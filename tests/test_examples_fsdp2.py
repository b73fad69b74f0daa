"""examples/fsdp2_train.py under torchrun (2 ranks, gloo, CPU): the checkpoint goes to --ckpt, by default a named
folder in the temporary folder, never the working directory (issue 21 item 10), and the resumed run ends with the
masks of the uninterrupted one."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cwd, tmp, *args):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", TMPDIR=str(tmp),
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(REPO / "examples" / "fsdp2_train.py"), "--steps", "12", "--delta",
           "3", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # both ranks share one stdout pipe: find the digests anywhere, not line by line
    return res.stdout, dict(re.findall(r"rank (\d) masks digest ([0-9a-f]{16})", res.stdout))


def test_checkpoint_goes_to_the_temporary_folder_and_the_resume_ends_with_the_same_masks(tmp_path):
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    out, full = _run(work, tmp)
    ckpt = tmp / "rigl_fast_fsdp2_ckpt"
    assert f"saved {ckpt} after step 6" in out and (ckpt / ".metadata").is_file()
    assert list(work.iterdir()) == [], "the example wrote into the working directory"
    out2, resumed = _run(work, tmp, "--resume")
    assert f"resumed from {ckpt} at step 6" in out2
    assert sorted(full) == ["0", "1"] and resumed == full
    named = tmp_path / "named"
    out3, _ = _run(work, tmp, "--ckpt", str(named), "--steps", "4", "--save-at", "2")
    assert f"saved {named} after step 2" in out3 and (named / ".metadata").is_file()
