"""The released guided-diffusion checkpoints as presets, and the shipped digits family.

Each released preset carries the flags the original README gives for its checkpoint (`argv`), the
checkpoint file name, and the README's recommended sampling settings (guidance scale, respacing).
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "adm-64": dict(
        kind="unet",
        checkpoint="64x64_diffusion.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
            "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
            "--resblock_updown True --use_new_attention_order True --use_fp16 True "
            "--use_scale_shift_norm True"
        ),
        recommended_scale=1.0,
        recommended_respacing="250",
    ),
    "adm-128": dict(
        kind="unet",
        checkpoint="128x128_diffusion.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
            "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
            "--use_scale_shift_norm True"
        ),
        recommended_scale=0.5,
        recommended_respacing="250",
    ),
    "adm-256": dict(
        kind="unet",
        checkpoint="256x256_diffusion.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
            "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
            "--use_fp16 True --use_scale_shift_norm True"
        ),
        recommended_scale=1.0,
        recommended_respacing="250",
    ),
    "adm-256-uncond": dict(
        kind="unet",
        checkpoint="256x256_diffusion_uncond.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
            "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
            "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
            "--use_fp16 True --use_scale_shift_norm True"
        ),
        recommended_scale=10.0,
        recommended_respacing="250",
    ),
    "adm-512": dict(
        kind="unet",
        checkpoint="512x512_diffusion.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 "
            "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
            "--use_fp16 False --use_scale_shift_norm True"
        ),
        recommended_scale=4.0,
        recommended_respacing="250",
    ),
    "adm-64-256": dict(
        kind="superres",
        checkpoint="64_256_upsampler.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--large_size 256 --small_size 64 --learn_sigma True --noise_schedule linear "
            "--num_channels 192 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
            "--use_fp16 True --use_scale_shift_norm True"
        ),
        recommended_scale=None,
        recommended_respacing="250",
    ),
    "adm-128-512": dict(
        kind="superres",
        checkpoint="128_512_upsampler.pt",
        argv=(
            "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 "
            "--large_size 512 --small_size 128 --learn_sigma True --noise_schedule linear "
            "--num_channels 192 --num_head_channels 64 --num_res_blocks 2 "
            "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
        ),
        recommended_scale=None,
        recommended_respacing="250",
    ),
    "adm-64-classifier": dict(
        kind="classifier",
        checkpoint="64x64_classifier.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
            "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
            "--resblock_updown True --use_new_attention_order True --use_fp16 True "
            "--use_scale_shift_norm True --classifier_scale 1.0 --classifier_depth 4"
        ),
        recommended_scale=1.0,
        recommended_respacing="250",
    ),
    "adm-128-classifier": dict(
        kind="classifier",
        checkpoint="128x128_classifier.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
            "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
            "--use_scale_shift_norm True --classifier_scale 0.5 --image_size 128 "
            "--classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
            "--classifier_width 128 --classifier_pool attention "
            "--classifier_resblock_updown True --classifier_use_scale_shift_norm True"
        ),
        recommended_scale=0.5,
        recommended_respacing="250",
    ),
    "adm-256-classifier": dict(
        kind="classifier",
        checkpoint="256x256_classifier.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
            "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
            "--use_fp16 True --use_scale_shift_norm True --classifier_scale 1.0"
        ),
        recommended_scale=1.0,
        recommended_respacing="250",
    ),
    "adm-512-classifier": dict(
        kind="classifier",
        checkpoint="512x512_classifier.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 "
            "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
            "--use_fp16 False --use_scale_shift_norm True --classifier_scale 4.0"
        ),
        recommended_scale=4.0,
        recommended_respacing="250",
    ),
    "lsun-bedroom": dict(
        kind="unet",
        checkpoint="lsun_bedroom.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
            "--dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear "
            "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
            "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
        ),
        recommended_scale=None,
        recommended_respacing="1000",
    ),
    "lsun-cat": dict(
        kind="unet",
        checkpoint="lsun_cat.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
            "--dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear "
            "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
            "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
        ),
        recommended_scale=None,
        recommended_respacing="1000",
    ),
    "lsun-horse": dict(
        kind="unet",
        checkpoint="lsun_horse.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
            "--dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear "
            "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
            "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
        ),
        recommended_scale=None,
        recommended_respacing="1000",
    ),
    "lsun-horse-nodropout": dict(
        kind="unet",
        checkpoint="lsun_horse_nodropout.pt",
        argv=(
            "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
            "--dropout 0.0 --image_size 256 --learn_sigma True --noise_schedule linear "
            "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
            "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
        ),
        recommended_scale=None,
        recommended_respacing="1000",
    ),
}

# The demo family trained on scikit-learn's handwritten digits by examples/train_digits.py; the
# weights ship in export/weights/. Grey levels are replicated into 3 channels (the ADM interface).
# The scale comes from examples/guidance_sweep.py (strong RBF-SVM judge: accuracy 0.815 at 4 vs
# 0.12 unguided, 200 DDIM-25 samples; the weaker logistic-regression judge said 0.99); the
# upsampler samples best from a noised bilinear upsample at t <= 500 (see guidance_sweep.upsample).
PRESETS.update(
    {
        "digits-16": dict(
            kind="unet",
            checkpoint="digits16_diffusion.pt",
            ctor=dict(
                image_size=16,
                in_channels=3,
                model_channels=32,
                out_channels=3,
                num_res_blocks=1,
                attention_resolutions=(2, 4),
                channel_mult=(1, 2, 2),
                num_head_channels=32,
                use_scale_shift_norm=True,
                resblock_updown=True,
                noise_schedule="cosine",
                diffusion_steps=1000,
                learn_sigma=False,
            ),  # fmt: skip
            recommended_scale=4.0,
            recommended_respacing="ddim25",
            grayscale=True,
        ),
        "digits-16-classifier": dict(
            kind="classifier",
            checkpoint="digits16_classifier.pt",
            ctor=dict(
                image_size=16,
                in_channels=3,
                model_channels=32,
                out_channels=10,
                num_res_blocks=2,
                attention_resolutions=(2, 4),
                channel_mult=(1, 2, 2),
                num_head_channels=32,
                use_scale_shift_norm=True,
                resblock_updown=True,
                pool="attention",
                noise_schedule="cosine",
                diffusion_steps=1000,
            ),  # fmt: skip
            recommended_scale=4.0,
            recommended_respacing="ddim25",
            grayscale=True,
        ),
        "digits-16-32-upsampler": dict(
            kind="superres",
            checkpoint="digits16_32_upsampler.pt",
            ctor=dict(
                image_size=32,
                small_size=16,
                in_channels=3,
                model_channels=32,
                out_channels=3,
                num_res_blocks=2,
                attention_resolutions=(4,),
                channel_mult=(1, 2, 2),
                num_head_channels=32,
                use_scale_shift_norm=True,
                resblock_updown=True,
                noise_schedule="cosine",
                diffusion_steps=1000,
                learn_sigma=False,
            ),  # fmt: skip
            recommended_scale=None,
            recommended_respacing="ddim25",
            grayscale=True,
            recommended_start_t=500,
        ),
    }
)
