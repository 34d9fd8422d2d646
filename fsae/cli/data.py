"""``fsae data synthetic|prepare|check``, ``fsae weights list|check``, ``fsae config show``."""

from __future__ import annotations

import math

from fsae.cli.common import add_set, run_paths
from fsae.errors import FsaeError

CONFIG_KINDS = ("train", "seg", "irn", "psa")


def _check_synthetic(spec) -> None:
    """Sizes the generator can draw: objects (ellipses of semi-axes up to ``body_axes[1]``, centred at least
    0.6 of a semi-axis inside the border) must fit in the image."""
    smallest = math.ceil(1.2 * spec.body_axes[1])
    for flag, value, low in (("--train", spec.num_train, 1), ("--val", spec.num_val, 0),
                             ("--classes", spec.num_classes, 1), ("--size", spec.image_size, smallest)):
        if value < low:
            why = f" (objects have semi-axes up to {spec.body_axes[1]:g} px)" if flag == "--size" else ""
            raise FsaeError(f"fsae data synthetic: {flag} {value} is not allowed; expected an integer >= {low}{why}")


def cmd_data_synthetic(args) -> None:
    from fsae.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(num_train=args.train, num_val=args.val, image_size=args.size,
                         num_classes=args.classes, seed=args.seed)
    _check_synthetic(spec)
    out = generate(args.out, spec)
    print(f"synthetic data set: {out} ({args.train} train / {args.val} val images, {args.classes} classes)")


def cmd_data_prepare(args) -> None:
    from fsae.data import prepare

    if args.kind == "voc":
        result = prepare.prepare_voc(args.root, sbd=args.sbd, workers=args.workers)
    else:
        result = prepare.prepare_coco(args.root, workers=args.workers, crowd=args.crowd)
    print(result.summary())


def cmd_data_check(args) -> int:
    from fsae.data.check import check_dataset, format_problems

    problems = check_dataset(args.kind, args.root, split=args.split, saliency=args.saliency, fast=args.fast,
                             num_classes=args.num_classes)
    print(format_problems(problems))
    if args.kind == "voc" and not args.fast:  # a report beside the problems: IRN's XML labels against fsae's
        from fsae.data.check import format_disagreements, label_disagreements

        report = format_disagreements(label_disagreements(args.root, split=args.split))
        if report:
            print(report)
    return 1 if problems else 0


def cmd_weights(args) -> int:
    from fsae.weights import recipe_weights, report_lines, weights_folder

    lines, ok = report_lines(recipe_weights(args.configs), hash_it=args.weights_cmd == "check")
    print(f"weights folder: {weights_folder()} (FSAE_WEIGHTS)")
    print("\n".join(lines))
    return 0 if ok or args.weights_cmd == "list" else 1


def cmd_config_show(args) -> None:
    import yaml

    config_path, _ = run_paths(args.config)
    if args.kind == "train":
        from fsae.config import load_config as load
    elif args.kind == "seg":
        from fsae.segment.config import load_seg_config as load
    elif args.kind == "irn":
        from fsae.refine.irn import load_irn_config as load
    else:
        from fsae.refine.psa import load_psa_config as load
    cfg = load(config_path, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="generate, prepare or check data sets").add_subparsers(dest="data_cmd",
                                                                                             required=True)
    p = data.add_parser("synthetic", help="write the generated WSSS data set (VOC layout)")
    p.add_argument("out", help="folder to write (JPEGImages/, SegmentationClass/, cls_labels.json, lists)")
    p.add_argument("--train", type=int, default=800, help="training images (default 800)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--classes", type=int, default=4, help="foreground classes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generator (default 0): same seed, same images")
    p.set_defaults(func=cmd_data_synthetic)
    p = data.add_parser("prepare", help="build train_aug / COCO masks and label files")
    p.add_argument("kind", choices=["voc", "coco"], help="data set: voc (VOC2012 + SBD train_aug) or coco (2014)")
    p.add_argument("--root", required=True, help="the data set's folder (VOC2012, or COCO with train2014/ and annotations/)")
    p.add_argument("--sbd", default=None, help="SBD benchmark_RELEASE/dataset folder (voc)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--crowd", choices=["class", "ignore"], default="class",
                   help="coco: draw crowd regions as their class (reference protocol) or as 255")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("check", help="validate a data set; one line per problem")
    p.add_argument("kind", choices=["voc", "coco", "saliency"], help="layout to check")
    p.add_argument("--root", required=True, help="the data set's folder")
    p.add_argument("--split", default=None, help="check only this image list, e.g. train_aug (default: every list)")
    p.add_argument("--saliency", default=None, help="folder of saliency <id>.png maps to check as well")
    p.add_argument("--fast", action="store_true", help="lists, label file and file existence only")
    p.add_argument("--num-classes", type=int, default=None,
                   help="foreground classes C (default: the data set's meta.json, else VOC 20 / COCO 80)")
    p.set_defaults(func=cmd_data_check)

    config = sub.add_parser("config", help="look at a recipe").add_subparsers(dest="config_cmd", required=True)
    p = config.add_parser("show", help="print the resolved config (defaults, then the recipe, then --set) as YAML")
    p.add_argument("config", help="a recipe YAML or a run directory (its config.yaml)")
    p.add_argument("--kind", choices=CONFIG_KINDS, default="train",
                   help="which stage's config the file is: train (fsae train / cam), seg, irn or psa (default train)")
    add_set(p)
    p.set_defaults(func=cmd_config_show)

    weights = sub.add_parser("weights", help="the pretrained files of every recipe: where, present, intact"
                             ).add_subparsers(dest="weights_cmd", required=True)
    for name, text in (("list", "each recipe's weight files and where they are looked for"),
                       ("check", "as list, with the sha256 of each present file checked; exit 1 if one is missing")):
        p = weights.add_parser(name, help=text)
        p.add_argument("--configs", default="configs", help="folder of recipe YAMLs (default configs/)")
        p.set_defaults(func=cmd_weights)
