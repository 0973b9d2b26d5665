"""Knowledge transfer is shown, not assumed: ``suites/sanity.yaml`` through the real
command, three seeds, and the gains' 95% confidence intervals (slow: about 30 minutes on
2 CPU cores; README gives the measured time)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO


def _gains_excluding_zero(tmp_path_factory) -> set[str]:
    from harness.report import leaderboard
    from harness.results import read_results
    out = tmp_path_factory.getbasetemp() / "sanity"
    if not (out / "results.parquet").exists():
        env = dict(os.environ, KD_SANITY_OUTPUT=str(out))
        subprocess.run([sys.executable, "-m", "harness", "run", "suites/sanity.yaml"], cwd=REPO, env=env, check=True)
    board = leaderboard(read_results(out))
    return set(board.loc[board["gain_lo"] > 0, "method"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sanity_suite_shows_knowledge_transfer(tmp_path_factory):
    """FGD (with inherit) and SSLD or Hinton KD: gains whose 95% interval excludes zero."""
    excludes_zero = _gains_excluding_zero(tmp_path_factory)
    assert "fgd" in excludes_zero
    assert excludes_zero & {"ssld", "hinton_kd"}


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.xfail(reason="issue 7 expects these too; measured at five seeds (README): GID, GKP and "
                          "feature_mse include zero, and so do ICSD and pixel KD", strict=False)
def test_sanity_suite_second_detection_distiller_and_segmentation(tmp_path_factory):
    excludes_zero = _gains_excluding_zero(tmp_path_factory)
    assert excludes_zero & {"feature_mse", "gid", "gkp"}
    assert excludes_zero & {"icsd", "pixel_kd"}
