from setuptools import find_packages, setup

setup(
    name="hpc_lensiam",
    version="0.1.0",
    description="LenSiam self-supervised representation learning for strong gravitational lenses, laptop to Slurm",
    packages=find_packages(include=["hpc_lensiam", "hpc_lensiam.*"]),
    python_requires=">=3.10",
    install_requires=[
        # simulation
        "numpy", "scipy", "lenstronomy>=1.12", "astropy", "mpi4py>=4", "mpich", "webdataset>=1.0",
        "pyyaml", "tqdm", "matplotlib",
        # training, embeddings, downstream (torch pinned in the Makefile: torch==2.14.1 torchvision==0.29.1)
        "torch", "torchvision", "deepspeed", "h5py", "umap-learn", "scikit-learn", "safetensors", "faiss-cpu",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["hpc-lensiam = hpc_lensiam.cli:main"]},
)
