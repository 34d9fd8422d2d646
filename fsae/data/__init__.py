"""Data sets in their real on-disk layouts (VOC, COCO) and the generated synthetic set (VOC layout)."""

from __future__ import annotations

from fsae.errors import DataError


def build_dataset(data_cfg, split: str, with_saliency: bool = False):
    """The configured data set for ``split`` (samples as described in ``fsae.data.voc``)."""
    if data_cfg.kind == "voc":
        from fsae.data.voc import VOCDataset

        return VOCDataset(data_cfg.root, split, num_classes=data_cfg.num_classes, mask_dir=data_cfg.mask_dir,
                          label_file=data_cfg.label_file,
                          saliency_dir=data_cfg.saliency_dir if with_saliency else None)
    if data_cfg.kind == "coco":
        from fsae.data.coco import COCODataset

        return COCODataset(data_cfg.root, split, num_classes=data_cfg.num_classes, mask_dir=data_cfg.mask_dir,
                           label_file=data_cfg.label_file,
                           saliency_dir=data_cfg.saliency_dir if with_saliency else None)
    raise DataError(f"unknown data kind {data_cfg.kind!r}; expected voc or coco")
