import json

import pytest

from fsae.demo import VARIANTS, run_demo


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    results = run_demo(tmp_path, seed=1, quick=True, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    for variant in VARIANTS:
        row = saved[variant]
        assert 0 < row["seed_miou"] <= 100
        # Table 6 columns: mIoU + FPR + FNR = 100 (the WSSS definition, all in %).
        assert row["seed_miou"] + row["fpr"] + row["fnr"] == pytest.approx(100, abs=1e-6)
        assert row["heldout_seed_miou"] + row["heldout_fpr"] + row["heldout_fnr"] == pytest.approx(100, abs=1e-6)
        assert 0 <= row["best_threshold"] <= 0.6
    assert saved["base_best_epoch"]["epoch"] in (1, 2)
    assert saved == json.loads(json.dumps(results))
    report = (tmp_path / "report.md").read_text()
    assert "+FAE+SAE" in report and "figures/curves.png" in report
    for name in ("curves.png", "overlays.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
