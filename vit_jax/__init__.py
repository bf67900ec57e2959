"""vit_jax: the Vision Transformer in JAX/Flax."""
import importlib.util
import os
import sys

# TensorFlow (which feeds tf.data and builds tfds datasets here) imports all of Keras at its own import when
# Keras 3 is installed, as TensorFlow's pip package makes sure it is: a large share of every process's
# TensorFlow start-up (BENCHMARKS.md, "Start-up"), for a library vit_jax never calls. Asking for legacy Keras,
# which is not installed, skips that import; `tf.keras` then fails when used, `import keras` works as ever.
# Only set when neither is decided yet: TensorFlow not imported, the variable not set, tf_keras not installed.
if ('tensorflow' not in sys.modules and 'TF_USE_LEGACY_KERAS' not in os.environ
    and importlib.util.find_spec('tf_keras') is None):
  os.environ['TF_USE_LEGACY_KERAS'] = '1'
