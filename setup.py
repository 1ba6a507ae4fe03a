from setuptools import find_packages, setup

setup(
    name="dopsd",
    version="0.1.0",
    description="D-OPSD: on-policy self-distillation trainer for step-distilled diffusion transformers",
    python_requires=">=3.10",
    packages=find_packages(include=["dopsd", "dopsd.*"]) + ["dopsd_kernels", "dopsd_world"],
    # The Triton kernels live in kernels/ but install as `dopsd_kernels`: a top-level `kernels` package
    # would shadow the PyPI `kernels` package that diffusers imports for hub attention kernels. The
    # miniature world (research code beside the library; dopsd never imports it) lives in benchmarks/world/.
    package_dir={"dopsd_kernels": "kernels", "dopsd_world": "benchmarks/world"},
    package_data={"dopsd": ["assets/**/*"], "dopsd_world": ["assets/*", "assets/**/*", "README.md"]},
    include_package_data=True,
    install_requires=[
        # torch is pinned in requirements.txt for CPU/CI; a range here keeps GPU users on their own build.
        "torch>=2.5",
        "diffusers>=0.42,<0.43",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "peft>=0.18",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "jinja2",
    ],
    extras_require={
        "distributed": ["deepspeed>=0.18", "webdataset>=1.0"],
        "kernels": ["triton>=3.3"],
        "gpu": ["flash-attn", "xformers"],
        "track": ["wandb>=0.19"],
        "dev": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["dopsd=dopsd.cli:main", "dopsd-world=dopsd_world.cli:main"]},
)
