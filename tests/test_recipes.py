"""Every VOC / COCO recipe, field by field, against the base repositories' script values.

Each table lists every field the recipe's YAML sets (the test fails on a field missing from the table)
with the value the base repository's script uses; the comment names the file and line. Fields marked
``fsae`` are fsae's own (paths, device, run names, the FSAE terms of the paper §4.1.3). Loading a recipe
never needs its weight file; ``WEIGHT_FILES`` checks which file ``weights`` stands for.
"""

from pathlib import Path

import pytest
import yaml

from fsae import weights as W
from fsae.config import load_config

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- IRN-style plain CAM (jiwoon-ahn/irn)
CAM_COMMON = {
    "data.long_side": [320, 640],           # irn step/train_cam.py:35 resize_long=(320, 640)
    "data.crop_size": 512,                  # irn run_sample.py:25 --cam_crop_size 512
    "data.hflip": True,                     # irn step/train_cam.py:35 hor_flip=True
    "data.jitter": None,                    # irn step/train_cam.py:35-36: no colour jitter
    "data.workers": 8,                      # irn run_sample.py:17 --num_workers (os.cpu_count() // 2); fsae 8
    "model.method": "cam",                  # irn run_sample.py:24 --cam_network net.resnet50_cam
    "model.backbone": "resnet50_irn",       # irn net/resnet50_cam.py:14 resnet50(strides=(2, 2, 2, 1))
    "model.output_stride": 16,              # the same strides
    "model.weights": "imagenet",            # irn net/resnet50.py:7 resnet50-19c8e357.pth
    "model.background_logit": 5.0,          # fsae: FSAE's S = [cams, 5] (fsae/methods/cam.py)
    "model.cam.freeze_bn": True,            # irn net/resnet50.py:11-14 FixedBatchNorm
    "model.cam.freeze_low_stages": True,    # irn net/resnet50_cam.py:28 x = stage2(x).detach(), :39-43 conv1/bn1
    "optim.name": "sgd",                    # irn misc/torchutils.py PolyOptimizer(torch.optim.SGD)
    "optim.lr": 0.1,                        # irn run_sample.py:28 --cam_learning_rate
    "optim.weight_decay": 1e-4,             # irn run_sample.py:29 --cam_weight_decay
    "optim.momentum": 1e-4,                 # irn misc/torchutils.py:12 SGD(params, lr, weight_decay): wd in the momentum slot
    "optim.poly_power": 0.9,                # irn misc/torchutils.py:11,24 PolyOptimizer momentum=0.9 (the poly power)
    "optim.new_layer_lr_mult": 10.0,        # irn step/train_cam.py:44 10 * lr on the classifier
    "train.epochs": 5,                      # irn run_sample.py:27 --cam_num_epoches
    "train.batch_size": 16,                 # irn run_sample.py:26 --cam_batch_size
    "train.device": "cuda",                 # fsae
    "infer.scales": [1.0, 0.5, 1.5, 2.0],   # irn run_sample.py:31 --cam_scales
    "infer.flip": True,                     # irn step/make_cam.py (image and its flip)
    "fsae.enabled": False,                  # fsae: the base method
}
VOC = {"data.kind": "voc", "data.root": "data/VOCdevkit/VOC2012", "data.num_classes": 20,  # fsae paths
       "data.train_split": "train_aug", "data.val_split": "val"}  # irn run_sample.py:20 train_aug.txt, val
COCO = {"data.kind": "coco", "data.root": "data/COCO", "data.num_classes": 80,
        "data.train_split": "train2014", "data.val_split": "val2014"}
RECIPES = {
    "voc/cam.yaml": {**CAM_COMMON, **VOC, "name": "voc_cam", "data.mask_dir": "SegmentationClassAug",
                     "infer.split": "train"},  # irn run_sample.py:21 --infer_list train.txt
    "coco/cam.yaml": {**CAM_COMMON, **COCO, "name": "coco_cam", "data.mask_dir": "SegmentationClass",
                      "train.val_every": 5,      # fsae: one val2014 pass at the end
                      "infer.split": "train2014",  # AMN run_sample_coco.py --infer_list train14
                      "eval.split": "train2014"},  # fsae/protocol.py: the ids scored (VOC: train)
}

# ---------------------------------------------------------------- SIPE (chenqi1126/SIPE)
SIPE = {
    **VOC, "name": "voc_sipe", "data.mask_dir": "SegmentationClassAug",
    "data.long_side": [320, 640],           # SIPE train_resnet50_SIPE.py:94 resize_long=(320, 640)
    "data.crop_size": 512,                  # SIPE train_resnet50_SIPE.py:72 --crop_size
    "data.hflip": True,                     # SIPE train_resnet50_SIPE.py:94 hor_flip=True
    "data.workers": 8,                      # SIPE train_resnet50_SIPE.py:69 --num_workers
    "model.method": "sipe",                 # SIPE train_resnet50_SIPE.py:67 --network network.resnet50_SIPE
    "model.backbone": "resnet50_irn",       # SIPE network/resnet50_SIPE.py:16 strides (2, 2, 2, 1), dilations 1
    "model.output_stride": 16,
    "model.weights": "imagenet",            # SIPE network/resnet50.py:6 resnet50-19c8e357.pth
    "model.score_scale": 10.0,              # fsae: FSAE's S scale
    "model.sipe.side_channels": [128, 128, 256, 256],  # SIPE network/resnet50_SIPE.py:24-27
    "model.sipe.freeze_bn": True,           # SIPE network/resnet50.py:11 FixedBatchNorm
    "model.sipe.freeze_low_stages": True,   # SIPE network/resnet50_SIPE.py forward: x2 detached
    "optim.name": "sgd",                    # SIPE train_resnet50_SIPE.py:119 PolyOptimizerSGD
    "optim.lr": 0.1,                        # SIPE train_resnet50_SIPE.py:68 --lr
    "optim.weight_decay": 1e-4,             # SIPE train_resnet50_SIPE.py:70 --wt_dec
    "optim.momentum": 1e-4,                 # SIPE tool/torchutils.py:14 SGD(params, lr, weight_decay): wd in the momentum slot
    "optim.schedule": "poly",
    "optim.poly_power": 0.9,                # SIPE tool/torchutils.py:13,26 PolyOptimizerSGD momentum=0.9 (the poly power)
    "optim.new_layer_lr_mult": 10.0,        # SIPE train_resnet50_SIPE.py:120-121 10 * lr on newly_added
    "optim.grad_clip": 1.0,                 # SIPE train_resnet50_SIPE.py:159 clip_grad_norm_(max_norm=1)
    "train.epochs": 5,                      # SIPE train_resnet50_SIPE.py:66 --max_epoches
    "train.batch_size": 16,                 # SIPE train_resnet50_SIPE.py:65 --batch_size
    "train.device": "cuda",                 # fsae
    "infer.split": "train",                 # SIPE run_voc.sh make_cam on train
    "infer.scales": [1.0, 0.5, 1.5, 2.0],   # SIPE make_cam.py scales
    "infer.flip": True,
    "fsae.enabled": False,
}
PAPER_FSAE = {"fsae.enabled": True}  # fsae: the paper's FAE + SAE defaults (§4.1.3)
SIPE_BASE = {"data.jitter": None}  # SIPE train_resnet50_SIPE.py:94-95: no colour jitter (the +FSAE recipes: §4.1.3's)
RECIPES["voc/sipe.yaml"] = {**SIPE, **SIPE_BASE}
RECIPES["voc/sipe_fsae.yaml"] = {**SIPE, **PAPER_FSAE, "name": "voc_sipe_fsae",
                                 "optim.lr": 0.05, "train.epochs": 10}  # the paper §4.1.3
# SIPE's COCO run (run_coco.sh:5-9 --dataset coco): the VOC arguments with the COCO branch's data.
SIPE_COCO = {
    **SIPE, **COCO, "name": "coco_sipe",
    "data.mask_dir": "SegmentationClass",   # SIPE eval_cam.py:52 SegmentationClass/train2014
    "data.num_classes": 80,                 # SIPE train_resnet50_SIPE.py:107 Net(num_cls=81)
    "data.train_split": "train2014",        # SIPE train_resnet50_SIPE.py:108 data/train_coco.txt
    "data.long_side": [320, 640],           # SIPE train_resnet50_SIPE.py:109 resize_long=(320, 640)
    "data.crop_size": 512,                  # SIPE train_resnet50_SIPE.py:110 crop_size=512
    "train.val_every": 0,                   # SIPE train_resnet50_SIPE.py:104-105 val_freq 99999: none
    "infer.split": "train2014",             # SIPE make_cam.py:103 data/train_coco.txt
    "infer.scales": [1.0, 0.5, 1.5, 2.0],   # SIPE make_cam.py:103 scales
    "eval.split": "train2014",              # SIPE eval_cam.py:52-55 train2014 GT, data/train_coco.txt
}
RECIPES["coco/sipe.yaml"] = {**SIPE_COCO, **SIPE_BASE}
# COCO: the paper keeps SIPE's own settings (§4.1.3 "For the others, we follow the default ...").
RECIPES["coco/sipe_fsae.yaml"] = {**SIPE_COCO, **PAPER_FSAE, "name": "coco_sipe_fsae"}

# ---------------------------------------------------------------- MCTformer V2 (xulianuwa/MCTformer @9606597)
MCT = {
    **VOC, "name": "voc_mctformer", "data.mask_dir": "SegmentationClassAug",
    "data.transform": "timm",               # MCTformer datasets.py build_transform -> timm create_transform
    "data.crop_size": 224,                  # MCTformer main.py:31 --input-size
    "data.long_side": None,
    "data.hflip": True,                     # timm create_transform hflip 0.5
    "data.auto_augment": "rand-m9-mstd0.5-inc1",  # MCTformer main.py:81 --aa
    "data.re_prob": 0.25,                   # MCTformer main.py:93 --reprob
    "data.jitter": None,                    # fsae: no extra jitter, timm's transform is the weak view
    "data.workers": 8,                      # fsae (MCTformer main.py --num_workers 10)
    "model.method": "mctformer",            # MCTformer run.sh:12 --model deit_small_MCTformerV2_patch16_224
    "model.backbone": "deit_small_patch16_224",
    "model.weights": "imagenet",            # MCTformer run.sh:18 --finetune .../deit_small_patch16_224-cd65a155.pth
    "model.background_logit": 5.0,          # fsae: FSAE's S = [patch CAMs, 5]
    "model.mct.img_size": 224,              # MCTformer main.py:31
    "model.mct.drop_path": 0.1,             # MCTformer main.py:35 --drop-path
    "model.mct.attention_layers": 3,        # MCTformer run.sh:31 --layer-index 3 (CAM generation)
    "model.mct.patch_refine": True,         # MCTformer run.sh:33 --patch-attn-refine
    "optim.name": "adamw",                  # MCTformer main.py:39 --opt
    "optim.lr": 6.25e-5,                    # MCTformer main.py:54 --lr 5e-4, scaled * 64 / 512 (main.py linear rule)
    "optim.weight_decay": 0.05,             # MCTformer main.py:49 --weight-decay
    "optim.new_layer_lr_mult": 1.0,
    "optim.schedule": "cosine",             # MCTformer main.py:52 --sched
    "optim.warmup_epochs": 5,               # MCTformer main.py:69 --warmup-epochs
    "optim.warmup_lr": 1e-6,                # MCTformer main.py:62 --warmup-lr
    "optim.min_lr": 1e-5,                   # MCTformer main.py:64 --min-lr
    "optim.lr_step": "epoch",               # MCTformer main.py:297 lr_scheduler.step(epoch) once per epoch
    "train.epochs": 60,                     # MCTformer main.py:26 --epochs
    "train.batch_size": 64,                 # MCTformer main.py:25 --batch-size
    "train.device": "cuda",
    "infer.split": "train",                 # MCTformer run.sh:26 --img-list voc12 train
    "infer.scales": [1.0],                  # MCTformer run.sh:24 --scales 1.0
    "infer.flip": True,
    "fsae.enabled": False,
}
RECIPES["voc/mctformer.yaml"] = MCT
RECIPES["voc/mctformer_fsae.yaml"] = {**MCT, **PAPER_FSAE, "name": "voc_mctformer_fsae", "fsae.start_epoch": 10}

# ---------------------------------------------------------------- PPC on EPS (usr922/wseg esp, halbielee/EPS)
PPC = {
    "data.saliency_dir": None,  # set below
    "data.hflip": True,                     # wseg esp data loader RandomHorizontalFlip
    "data.jitter": [0.3, 0.3, 0.3, 0.1],    # wseg esp contrast_train.py ColorJitter(0.3, 0.3, 0.3, 0.1)
    "data.workers": 8,                      # wseg esp contrast_train.py:41 --num_workers
    "model.method": "ppc",
    "model.backbone": "resnet38",           # wseg esp script/script_contrast.sh:19 network.resnet38_contrast
    "model.output_stride": 8,
    "model.weights": "data/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params",  # contrast_train.py:36
    "model.resnet38.width": 1.0, "model.resnet38.freeze_bn": True, "model.resnet38.freeze_stem": True,
    "model.eps.tau": 0.4,                   # wseg esp script/script_contrast.sh:24 --tau 0.4
    "model.ppc.view_size": 128, "model.ppc.proj_dim": 128, "model.ppc.temperature": 0.1,
    "model.ppc.contrast_weight": 0.1, "model.ppc.bg_score": 0.10, "model.ppc.prototype_divisor": 16,
    "model.ppc.ecr_fraction": 0.2, "model.ppc.min_pool_fraction": 0.25, "model.ppc.pcm_dims": [64, 128],
    # (the PPC terms: wseg esp module/train.py, checked term by term in tests/test_ppc_eps.py)
    "optim.name": "sgd",
    "optim.lr": 0.01,                       # wseg esp contrast_train.py:40 --lr
    "optim.weight_decay": 5e-4,             # wseg esp contrast_train.py:42 --wt_dec
    "optim.momentum": 5e-4,                 # wseg esp util/torchutils.py:7 SGD(params, lr, weight_decay): wd in the momentum slot
    "optim.schedule": "poly", "optim.poly_power": 0.9, "optim.new_layer_lr_mult": 10.0,
    "train.device": "cuda",
    "infer.scales": [0.5, 1.0, 1.5, 2.0],   # wseg esp contrast_infer.py scales
    "infer.flip": True,
    "fsae.enabled": False,
}
PPC_VOC = {**PPC, **VOC, "name": "voc_ppc_eps", "data.mask_dir": "SegmentationClassAug",
           "data.saliency_dir": "SALImages",
           "data.long_side": [448, 768],    # wseg esp contrast_train.py:32 --resize_size
           "data.crop_size": 448,           # wseg esp script/script_contrast.sh:23 --crop_size
           "model.eps.alpha": 0.5,          # wseg esp contrast_train.py:50 --alpha
           "train.epochs": 30,              # the paper §4.1.3: 40k iterations at batch 8
           "train.batch_size": 8,           # wseg esp script/script_contrast.sh:27 --batch_size
           "infer.split": "train",
           "eval.threshold": 0.22}          # wseg esp script/script_contrast.sh:39 --thr 0.22
PPC_COCO = {**PPC, **COCO, "name": "coco_ppc_eps", "data.mask_dir": "SegmentationClass",
            "data.saliency_dir": "SALImages",
            "data.long_side": [256, 448],   # EPS script/coco_eps.sh:25 --resize_size 256 448
            "data.crop_size": 321,          # EPS script/coco_eps.sh:26 --crop_size 321
            "model.eps.alpha": 0.9,         # EPS script/coco_eps.sh:28 --lam 0.9
            "train.epochs": 50,             # EPS script/coco_eps.sh:29 --max_iters 256500 = 50 x 5,130
            "train.batch_size": 16,         # EPS script/coco_eps.sh:30 --batch_size 16
            "train.val_every": 10,          # fsae
            "infer.split": "train2014",
            "eval.split": "train2014",      # fsae/protocol.py: the ids scored (VOC: train)
            "eval.threshold": 0.20}         # EPS script/coco_eps.sh --thr (inference)
RECIPES["voc/ppc_eps.yaml"] = PPC_VOC
RECIPES["voc/ppc_eps_fsae.yaml"] = {**PPC_VOC, **PAPER_FSAE, "name": "voc_ppc_eps_fsae", "fsae.teacher": "reuse"}
RECIPES["coco/ppc_eps.yaml"] = PPC_COCO
# The base at the FSAE authors' PPC + FSAE schedule (ssl script/coco_ppc1.sh:29-30, contrast_train.py:162).
RECIPES["coco/ppc_eps_200ep.yaml"] = {**PPC_COCO, "name": "coco_ppc_eps_200ep", "train.epochs": 200}
RECIPES["coco/ppc_eps_fsae.yaml"] = {**PPC_COCO, **PAPER_FSAE, "name": "coco_ppc_eps_fsae",
                                     "fsae.teacher": "ema", "fsae.ema_decay": 0.999}  # the paper §4.1.3 (COCO)
# The FSAE authors' PPC + FSAE code (obeychoi0120/wseg, branch ssl), where it differs from the paper.
AUTHORS_FSAE = {
    "fsae.enabled": True,
    "fsae.tau_fae": 0.95,                   # ssl contrast_train.py:74 --p_cutoff 0.95
    "fsae.tau_sae": 0.8,                    # ssl contrast_train.py:93 --bdry_cutoff 0.8
    "fsae.kernel_size": 3,                  # ssl script/voc_ppc0.sh --bdry_size 3
    "fsae.weight": 1.0,                     # ssl module/train.py:403 bdry_lambda 1.0
    "fsae.teacher": "separate",             # ssl module/train.py:359-361 a no-grad pass in train mode
    "fsae.strong_ops": 5,                   # ssl data/dataset.py:95 --n_strong_augs 5
    "fsae.strong_replacement": True,        # ssl data/augmentation/randaugment.py:221 random.choices
    "fsae.enhance_range": [0.05, 0.95],     # ssl randaugment.py:168-175
    "fsae.posterize_bits": [4, 7],          # ssl randaugment.py:174, 225
    "fsae.blur_kernel": "per_run",          # ssl data/dataset.py:92-93
    "fsae.blur": [0.1, 2.0],                # ssl data/dataset.py:94 GaussianBlur sigma=(0.1, 2.0)
    "fsae.strong_source": "original",       # ssl data/dataset.py:224-246, 257-292
    "fsae.loss_form": "two_term",           # ssl module/train.py:396-403
    "fsae.mask_padding": False,             # ssl module/train.py:369, 396
}
AUTHORS_OPTIM = {"optim.momentum": 5e-4}  # ssl util/torchutils.py:5-6 PolyOptimizer: weight_decay as momentum
RECIPES["voc/ppc_eps_fsae_authors.yaml"] = {**PPC_VOC, **AUTHORS_FSAE, **AUTHORS_OPTIM,
                                            "name": "voc_ppc_eps_fsae_authors"}
RECIPES["coco/ppc_eps_fsae_authors.yaml"] = {**PPC_COCO, **AUTHORS_FSAE, **AUTHORS_OPTIM,
                                             "name": "coco_ppc_eps_fsae_authors",
                                             "train.epochs": 200,  # ssl script/coco_ppc1.sh:26-29, contrast_train.py:162
                                             "fsae.teacher": "ema",  # ssl script/coco_ppc1.sh:33 --use_ema
                                             "fsae.ema_decay": 0.999,  # ssl contrast_train.py:69 --ema_m
                                             "fsae.ema_mode": "train"}  # ssl module/train.py:355-361, model.train()

# ---------------------------------------------------------------- IRN (jiwoon-ahn/irn run_sample.py)
IRN_TABLE = {
    "name": "voc_irn", "device": "cuda",    # fsae
    "ir_label.fg_threshold": 0.30,          # irn run_sample.py:35 --conf_fg_thres
    "ir_label.bg_threshold": 0.05,          # irn run_sample.py:36 --conf_bg_thres
    "ir_label.gt_prob": 0.7,                # irn misc/imutils.py crf_inference_label gt_prob=0.7
    "ir_label.crf.iterations": 10,          # irn misc/imutils.py crf_inference_label t=10
    "ir_label.crf.gaussian_sxy": 3, "ir_label.crf.gaussian_compat": 3,  # irn misc/imutils.py addPairwiseGaussian
    "ir_label.crf.bilateral_sxy": 50, "ir_label.crf.bilateral_srgb": 5, "ir_label.crf.bilateral_compat": 10,
    "net.backbone": "resnet50",             # irn net/resnet50_irn.py:14 resnet50(strides=[2, 2, 2, 1])
    "net.weights": "imagenet",              # irn net/resnet50.py:7 resnet50-19c8e357.pth
    "train.epochs": 3,                      # irn run_sample.py:42 --irn_num_epoches
    "train.batch_size": 32,                 # irn run_sample.py:41 --irn_batch_size
    "train.crop_size": 512,                 # irn run_sample.py:40 --irn_crop_size
    "train.scale_range": [0.5, 1.5],        # irn step/train_irn.py rescale=(0.5, 1.5)
    "train.hflip": True,
    "train.radius": 10,                     # irn step/train_irn.py PathIndex(radius=10)
    "train.lr": 0.1,                        # irn run_sample.py:43 --irn_learning_rate
    "train.weight_decay": 1e-4,             # irn run_sample.py:44 --irn_weight_decay
    "train.momentum": 1e-4,                 # irn misc/torchutils.py PolyOptimizer: weight decay as momentum
    "train.poly_power": 0.9,
    "train.workers": 8,
    "walk.radius": 5,                       # irn step/make_sem_seg_labels.py PathIndex radius 5
    "walk.beta": 10,                        # irn run_sample.py:47 --beta
    "walk.exp_times": 8,                    # irn run_sample.py:48 --exp_times
    "walk.bg_threshold": 0.25,              # irn run_sample.py:52 --sem_seg_bg_thres
}

# ---------------------------------------------------------------- DeepLab (kazuto1011/deeplab-pytorch)
SEG = {
    "data.crop_size": 321,                  # deeplab-pytorch configs/voc12.yaml:26 SIZE.TRAIN
    "data.scale_range": [0.5, 1.5],         # configs/voc12.yaml:9 SCALES 0.5..1.5
    "data.hflip": True,                     # libs/datasets/base.py random flip
    "data.workers": 8,                      # fsae
    "data.mask_dir": None,                  # fsae: the pseudo-masks (--masks)
    "model.backbone": "resnet101_deeplab",  # libs/models/deeplabv2.py:46-51 MSRA ResNet-101, output stride 8
    "model.output_stride": 8,
    "model.weights": "imagenet",            # configs/voc12.yaml:33 INIT_MODEL deeplabv1_resnet101-coco.pth
    "model.freeze_bn": True,                # main.py:208 model.module.base.freeze_bn()
    "optim.momentum": 0.9,                  # configs/voc12.yaml:44 MOMENTUM
    "optim.weight_decay": 5e-4,             # configs/voc12.yaml:47 WEIGHT_DECAY
    "optim.poly_power": 0.9,                # configs/voc12.yaml:46 POLY_POWER
    "optim.head_lr_mult": 10.0,             # main.py:169-173 10x on the ASPP weights
    "train.batch_size": 10,                 # configs/voc12.yaml:38-41 5 x ITER_SIZE 2
    "train.device": "cuda",
    "infer.scales": [0.5, 0.75, 1.0, 1.25, 1.5],  # configs/voc12.yaml:9 SCALES
    "infer.flip": True,
    "infer.crf.enabled": True,
    "infer.crf.iterations": 10,             # configs/voc12.yaml:51 CRF.ITER_MAX
    "infer.crf.gaussian_sxy": 1.0,          # configs/voc12.yaml:53 POS_XY_STD
    "infer.crf.gaussian_compat": 3.0,       # configs/voc12.yaml:52 POS_W
    "infer.crf.bilateral_sxy": 67.0,        # configs/voc12.yaml:55 BI_XY_STD
    "infer.crf.bilateral_srgb": 3.0,        # configs/voc12.yaml:56 BI_RGB_STD
    "infer.crf.bilateral_compat": 4.0,      # configs/voc12.yaml:54 BI_W
}
SEG_VOC = {**SEG, **VOC, "data.test_split": "test", "data.gt_dir": "SegmentationClass",
           "train.iterations": 20000,       # configs/voc12.yaml:42 ITER_MAX
           "train.checkpoint_every": 1000}  # fsae
SEG_TABLES = {
    "voc/deeplabv2_r101.yaml": {**SEG_VOC, "name": "voc_deeplabv2_r101", "model.arch": "deeplabv2",
                                "model.aspp_rates": [6, 12, 18, 24],  # configs/voc12.yaml:32 ATROUS_RATES
                                "optim.lr": 2.5e-4,                   # configs/voc12.yaml:45 LR
                                "optim.bias_lr_mult": 2.0,  # main.py:174-177 ASPP biases at 20 x LR
                                "optim.bias_weight_decay": False,  # main.py:177 weight_decay 0.0 on them
                                "train.msc_scales": [0.5, 0.75]},  # libs/models/__init__.py:38 MSC; msc.py:26-47
    "voc/deeplabv1_r101.yaml": {**SEG_VOC, "name": "voc_deeplabv1_r101", "model.arch": "deeplabv1",
                                "model.largefov_dilation": 12, "model.largefov_channels": 1024,
                                "model.dropout": 0.5,  # DeepLab-V1 LargeFOV (Chen et al., ICLR 2015, sec. 4)
                                "optim.lr": 1e-3},
    "coco/deeplabv2_r101.yaml": {**SEG, **COCO, "name": "coco_deeplabv2_r101", "model.arch": "deeplabv2",
                                 "model.aspp_rates": [6, 12, 18, 24], "optim.lr": 2.5e-4,
                                 "optim.bias_lr_mult": 2.0,  # main.py:174-177 ASPP biases at 20 x LR
                                 "optim.bias_weight_decay": False,  # main.py:177 weight_decay 0.0 on them
                                 "train.msc_scales": [0.5, 0.75],  # libs/models/__init__.py:38 MSC; msc.py:26-47
                                 "data.test_split": "", "data.gt_dir": "SegmentationClass/val2014",
                                 "train.iterations": 100000,  # configs/cocostuff164k.yaml ITER_MAX 100000
                                 "train.checkpoint_every": 5000},
}

# Recipe -> the file ``weights`` stands for (fsae.weights; README table).
WEIGHT_FILES = {
    "voc/cam.yaml": "resnet50-19c8e357.pth", "coco/cam.yaml": "resnet50-19c8e357.pth",
    "voc/sipe.yaml": "resnet50-19c8e357.pth", "voc/sipe_fsae.yaml": "resnet50-19c8e357.pth",
    "coco/sipe.yaml": "resnet50-19c8e357.pth", "coco/sipe_fsae.yaml": "resnet50-19c8e357.pth",
    "voc/irn.yaml": "resnet50-19c8e357.pth",
    "voc/mctformer.yaml": "deit_small_patch16_224-cd65a155.pth",
    "voc/mctformer_fsae.yaml": "deit_small_patch16_224-cd65a155.pth",
    **{f"{d}/ppc_eps{s}.yaml": "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
       for d in ("voc", "coco") for s in ("", "_fsae", "_fsae_authors")},
    "coco/ppc_eps_200ep.yaml": "ilsvrc-cls_rna-a1_cls1000_ep-0001.params",
    **{name: "deeplabv1_resnet101-coco.pth" for name in SEG_TABLES},
}

# The PPC authors' and MCTformer's DeepLab recipes: their tables, with the sources, in test_segment_ppc.py.
from test_segment_ppc import RECIPES as OTHER_SEG_TABLES  # noqa: E402

SEG_TABLES.update({name.removeprefix("configs/"): table for name, table in OTHER_SEG_TABLES.items()})
WEIGHT_FILES.update({"voc/deeplabv2_r101_ppc.yaml": "resnet101s-03a0f310.pth",  # wseg resnet.py:16
                     "voc/deeplabv1_r101_ppc.yaml": "resnet101s-03a0f310.pth",
                     "voc/deeplab_r38_mct.yaml": "res38_cls.pth"})  # MCTformer README:40 = PSA README:51,73


def leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load(recipe: str, path: Path):
    if recipe in SEG_TABLES:
        from fsae.segment.config import load_seg_config

        return load_seg_config(path)
    if recipe == "voc/irn.yaml":
        from fsae.refine.irn.config import load_irn_config

        return load_irn_config(path)
    return load_config(path)


ALL = {**RECIPES, **SEG_TABLES, "voc/irn.yaml": IRN_TABLE}


OWN_TESTS = {"voc/psa.yaml"}  # field by field in tests/test_psa.py (MCTformer's PSA settings)


def test_every_voc_and_coco_recipe_has_a_table():
    shipped = {p.relative_to(REPO / "configs").as_posix() for d in ("voc", "coco")
               for p in (REPO / "configs" / d).glob("*.yaml")} - OWN_TESTS
    assert shipped == set(ALL) == set(WEIGHT_FILES)


@pytest.mark.parametrize("recipe", sorted(ALL))
def test_recipe_fields_are_the_base_repository_values(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FSAE_WEIGHTS", str(tmp_path))  # no weight file anywhere: loading must not need one
    path = REPO / "configs" / recipe
    raw = dict(leaves(yaml.safe_load(path.read_text())))
    table = ALL[recipe]
    assert set(raw) == set(table), f"{recipe}: fields without a table entry {sorted(set(raw) - set(table))}, " \
                                   f"table entries not in the recipe {sorted(set(table) - set(raw))}"
    cfg = load(recipe, path)
    for key, want in table.items():
        assert raw[key] == want, f"{recipe}: {key} = {raw[key]!r}, the base repository's value is {want!r}"
        got = field(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == want, f"{recipe}: loaded {key} = {got!r}"


@pytest.mark.parametrize("recipe", sorted(WEIGHT_FILES))
def test_weights_entry_names_the_base_repository_file(recipe):
    entries = [e for e in W.recipe_weights(REPO / "configs") if e.recipe == REPO / "configs" / recipe]
    assert len(entries) == 1
    assert entries[0].files[0].filename == WEIGHT_FILES[recipe]
