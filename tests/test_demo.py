import json

import numpy as np
import pytest

from fsae.demo import VARIANTS, run_demo
from fsae.io import read_mask


def plain_seed_miou(out, variant, threshold, num_classes=4):
    """100 * mean IoU over the labels present in GT or prediction, pixels summed over the train split."""
    inter, union = np.zeros(num_classes + 1), np.zeros(num_classes + 1)
    for seed in sorted((out / variant / "seeds").glob("*.npz")):
        with np.load(seed) as f:
            keys, cams = f["keys"], f["cams"].astype(np.float32)
        planes = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams])
        pred = np.concatenate([[0], keys])[planes.argmax(0)]  # ties to background, then the first key
        gt = read_mask(out / "data" / "SegmentationClass" / f"{seed.stem}.png", num_classes)
        scored = gt != 255
        for k in range(num_classes + 1):
            p, g = (pred == k) & scored, (gt == k) & scored
            inter[k] += (p & g).sum()
            union[k] += (p | g).sum()
    return 100 * np.mean(inter[union > 0] / union[union > 0])


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    results = run_demo(tmp_path, seed=1, quick=True, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    for variant in VARIANTS:
        row = saved[variant]
        assert 0 < row["seed_miou"] <= 100
        # The reported seed mIoU, recomputed plainly from the seed files and GT at the reported threshold.
        assert row["seed_miou"] == pytest.approx(plain_seed_miou(tmp_path, variant, row["best_threshold"]), abs=1e-9)
        assert 0 <= row["best_threshold"] <= 0.6
    assert saved["base_best_epoch"]["epoch"] in (1, 2)
    assert saved == json.loads(json.dumps(results))
    report = (tmp_path / "report.md").read_text()
    assert "+FAE+SAE" in report and "figures/curves.png" in report
    for name in ("curves.png", "overlays.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
