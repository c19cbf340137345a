"""medvlm: an open medical vision-language foundation model codebase.

One install for everything:  pip install -e .[dev]
Extras: dev (tests, benchmarks), gpu (flash-attn, xformers), metrics (report-generation scorers).
"""
from setuptools import setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "torchvision",
    "open_clip_torch>=3.0",
    "timm>=1.0",
    "transformers>=4.56",
    "tokenizers",
    "sentencepiece",  # SentencePiece-only tokenizers (tokenizer.model: LLaVA-Med, Llama-2, Mistral v0.x)
    "webdataset>=1.0",
    "peft>=0.15",
    "safetensors",
    "huggingface_hub",
    "omegaconf>=2.3",
    "pyyaml",
    "numpy",
    "pillow",
    "tqdm",
    "pydicom>=3.0",
    "nibabel>=5.0",
    "pyahocorasick>=2.0",
    "pyarrow",
    "matplotlib",
    "scikit-learn",
    "tensorboard",
]

EXTRAS = {
    "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist", "psutil", "trl"],  # trl: the peer of the preference losses
    "gpu": ["flash-attn", "xformers"],
    "metrics": ["pycocoevalcap"],
}

setup(
    name="medvlm",
    version="0.1.0",
    description="Medical vision-language models: CLIP pretraining, LLaVA-style instruction tuning, evaluation",
    python_requires=">=3.10",
    packages=[
        "vlm", "vlm.data", "vlm.models",
        "train", "eval", "eval.benchmarks",
        "data_prep", "data_prep.sources",
    ],
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
