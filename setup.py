"""lcjax: long-context training in JAX (USP, MsT, Deep Optimizer States, DiLoCo/DiPaCo)."""
import setuptools

setuptools.setup(
    name="lcjax",
    version="0.1.0",
    description="Long-context transformer training in JAX: sequence parallelism, mini-sequences, "
                "host-offloaded optimizer states and DiLoCo/DiPaCo.",
    packages=setuptools.find_packages(include=["lcjax", "lcjax.*"]),
    package_data={"lcjax": ["target_configs/*.txtpb"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2", "flax>=0.12", "optax>=0.2.5", "orbax-checkpoint>=0.11", "chex",
        "ml_collections", "numpy", "tensorboardX", "tqdm",
    ],
    extras_require={
        "tokenizers": ["tokenizers", "sentencepiece"],
        "arrayrecord": ["array_record"],  # data.source="arrayrecord", prepare_data.py
        "test": ["pytest", "pytest-xdist", "tokenizers", "sentencepiece", "matplotlib",
                 "array_record", "nbclient", "nbformat", "ipykernel"],
    },
)
