"""The smallest program found whose oneDNN dot fusion aborts XLA:CPU at run time ("partition compile failed",
SIGILL: exit status 132) in jaxlib 0.10.2: a dot, a bias added, the sum squared. The fused computation is

  dot(x, w) -> add(_, broadcast(b)) -> multiply(add, add)

Without the bias, or with the square replaced (x2, tanh, abs, times a vector), the same fusion runs. This is
why jax.grad of a ViT block aborts while its forward runs: GELU's derivative multiplies its input, the dot
plus bias, by itself (both the tanh and the erf form; the gradient of a ReLU MLP runs). Putting
`jax.lax.optimization_barrier` on the dot's output does not keep the square out of the fusion. Prints the
largest difference to XLA's default kernel and exits 0 when the fusion runs.

  python tests/onednn_abort_repro.py
"""
import jax
import jax.numpy as jnp
import numpy as np

ONEDNN_DOT = {'xla_cpu_use_onednn': True, 'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


def biased_square(x, w, b):
  return (x @ w + b) ** 2


def main():
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, 192), (192, 10), (10,))]
  lowered = jax.jit(biased_square).lower(*args)
  expected = lowered.compile()(*args)
  compiled = lowered.compile(compiler_options=ONEDNN_DOT)
  kinds = sorted({line.split('"kind":"')[1].split('"')[0] for line in compiled.as_text().splitlines()
                  if '"kind":"' in line})
  print(f'compiled with {kinds}', flush=True)
  result = compiled(*args)  # Aborts here in jaxlib 0.10.2.
  print(f'ran; largest difference to the default kernel: {float(jnp.max(jnp.abs(result - expected))):.3g}')


if __name__ == '__main__':
  main()
