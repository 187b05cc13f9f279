from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="upcycled-moe",
    version="0.1.0",
    description="Upcycle dense Hugging Face LLMs (Llama, Mistral, Qwen2/3, Nemotron) into Mixture-of-Experts models and train them.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["upcycled_moe", "upcycled_moe.*", "trainer_scripts", "trainer_scripts.*", "experiments"]),
    py_modules=["upcycled_moe_cli"],  # the console entry points: --help without importing torch
    package_data={"upcycled_moe": ["model_cards/*.md"], "trainer_scripts": ["accelerate_configs/*.yaml"], "experiments": ["*.yaml"]},
    install_requires=[
        "torch>=2.9",
        "transformers>=5.17,<6",
        "accelerate>=1.10",
        "safetensors>=0.4",
        "huggingface_hub>=1.5",
        "datasets>=3.0",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.7",
        "peft>=0.17",
    ],
    extras_require={
        "gguf": ["gguf>=0.10"],
        # triton: the fused kernels' tests run on CPU through the Triton interpreter
        "dev": ["pytest>=8", "gguf>=0.10", "httpx", "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "triton": ["triton>=3.2"],
    },
    entry_points={
        "console_scripts": [
            "upcycle-moe=upcycled_moe_cli:upcycle_moe",
            "upcycle-moe-pretrain=upcycled_moe_cli:pretrain",
            "upcycle-moe-finetune=upcycled_moe_cli:finetune",
        ]
    },
)
