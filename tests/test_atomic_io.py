"""Durable writes: ``atomic_write_*`` fsyncs the data, renames, then fsyncs the folder (a
rename is only durable once its directory entry is); the global checkpoint keeps its round
inside the weights file, so a crash between its two files cannot mislabel the weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dpfl.shared import io


def test_write_fsyncs_file_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(("fsync", "dir" if os.path.isdir(target) else "file", target))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "sub" / "state.json"
    io.atomic_write_json(path, {"eps": 1.5})
    assert [c[:2] for c in calls] == [("fsync", "file"), ("replace", calls[1][1]),
                                      ("fsync", "dir")]
    assert calls[1][2] == str(path) and calls[2][2] == str(path.parent)
    assert os.path.dirname(calls[1][1]) == str(path.parent)  # temp file beside the target
    assert json.loads(path.read_text()) == {"eps": 1.5}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    io.atomic_write_text(path, "old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        io.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_checkpoint_round_travels_with_its_weights(tmp_path):
    """The round lives in the weights file's own metadata, so the one atomic rename replaces
    both together: resumption can never pair round 2's weights with round 1 (which would
    train round 2 twice on top of itself). A weights file without a round is refused."""
    from safetensors.numpy import save_file

    from dpfl.server.rounds import GlobalCheckpoint
    from dpfl.shared.errors import StateError

    ckpt = GlobalCheckpoint(tmp_path / "global")
    r1 = {"w": np.zeros((2, 2), np.float32)}
    r2 = {"w": np.ones((2, 2), np.float32)}
    ckpt.save(1, r1, "sha256:x")
    ckpt.save(2, r2, "sha256:x")
    assert sorted(p.name for p in ckpt.folder.iterdir()) == ["adapter.safetensors"]
    rnd, weights = ckpt.load()
    assert rnd == 2
    np.testing.assert_array_equal(weights["w"], r2["w"])
    assert GlobalCheckpoint(tmp_path / "none").load() is None
    save_file(r1, str(ckpt.weights))  # no round in its metadata
    with pytest.raises(StateError, match="holds no round"):
        ckpt.load()


def test_site_latent_cache_is_written_atomically(tmp_path, monkeypatch):
    """The site's latent cache goes through atomic_write_bytes: a torn cache left by a kill
    would make the site fail on every later round."""
    from dpfl.client import site as site_mod
    from dpfl.shared.federation.config import SiteConfig
    from dpfl.shared.ldm.models import build_ldm

    from .test_federation import _silo

    written = []
    real = site_mod.atomic_write_bytes
    monkeypatch.setattr(site_mod, "atomic_write_bytes",
                        lambda path, data: written.append(path) or real(path, data))
    _silo(tmp_path / "silo.npz", 0, (0, 1))
    ldm = build_ldm("tiny", seed=0)
    ldm.card["verified"] = "sha256:" + "ab" * 32
    site = site_mod.Site(SiteConfig(site_id="s", data=str(tmp_path / "silo.npz"),
                                    state_dir=str(tmp_path / "state"), device="cpu"))
    z, y = site.silo(ldm)
    assert len(written) == 1 and written[0].parent == tmp_path / "state"
    again = site_mod.Site(site.cfg).silo(ldm)  # read back from the cache
    assert len(written) == 1 and (again[0] == z).all() and (again[1] == y).all()


def test_atomic_writes_honour_the_umask(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import os, sys; os.umask(0o027); from dpfl.shared.io import atomic_write_text; "
            "atomic_write_text(sys.argv[1], 'x')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.txt")], check=True)
    assert os.stat(tmp_path / "f.txt").st_mode & 0o777 == 0o640
