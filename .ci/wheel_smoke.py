"""Smoke test of an installed (non-editable) tp-jax, run from outside the checkout.

  python wheel_smoke.py WHEEL CHECKOUT

1. The wheel holds every ``tp_jax/**/*.py`` of the checkout, and nothing outside ``tp_jax``.
2. Every module of the checkout's ``tp_jax`` imports from site-packages (not the checkout).
3. One TJML-DTP step of LeNet on generated data gives finite gradients for every block.
4. With ``$TP_JAX_DATA`` set, the main job's binary trains one short epoch on the real data:
   ``experiments/`` (binaries and configs, not installed) is copied beside the run, as a user
   who installed the library runs a checkout's binaries.
"""

import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile


def checkout_modules(checkout: pathlib.Path) -> list[str]:
  """Module names of every tp_jax source file in the checkout, packages included."""
  names = []
  for path in sorted((checkout / 'tp_jax').rglob('*.py')):
    parts = path.relative_to(checkout).with_suffix('').parts
    names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
  return names


def check_wheel_files(wheel: pathlib.Path, checkout: pathlib.Path) -> None:
  in_wheel = set(zipfile.ZipFile(wheel).namelist())
  wanted = {p.relative_to(checkout).as_posix() for p in (checkout / 'tp_jax').rglob('*.py')}
  missing = sorted(wanted - in_wheel)
  if missing:
    sys.exit(f'the wheel {wheel.name} lacks {len(missing)} source files: {missing}')
  stray = sorted(n for n in in_wheel if n.endswith('.py') and not n.startswith('tp_jax/'))
  if stray:
    sys.exit(f'the wheel {wheel.name} installs modules outside tp_jax: {stray}')
  print(f'wheel: all {len(wanted)} tp_jax source files present, nothing outside tp_jax')


def check_imports(checkout: pathlib.Path) -> None:
  for name in checkout_modules(checkout):
    module = importlib.import_module(name)
    origin = pathlib.Path(module.__file__).resolve()
    if checkout.resolve() in origin.parents:
      sys.exit(f'{name} was imported from the checkout ({origin}), not the installed package')
  print(f'imports: {len(checkout_modules(checkout))} modules from site-packages')


def check_tjml_step() -> None:
  import jax
  import jax.numpy as jnp
  from tp_jax import dtp, layers, models, network

  net = models.lenet()
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (8, 28, 28, 1))
  y = jax.random.randint(ky, (8,), 0, 10)
  params = network.init(net, kp, x)
  grads, metrics = dtp.local_grads(net, params, None, layers.TJMC, 0.5, x, y)
  norms = [float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(b)))) for b in grads]
  if not all(jnp.isfinite(jnp.array(norms))) or not all(n > 0 for n in norms):
    sys.exit(f'TJML-DTP step: block gradient norms {norms}')
  print(
      f'TJML-DTP step: loss {float(metrics["loss"]):.4f}, block gradient norms '
      f'{[round(n, 4) for n in norms]}'
  )


def check_main_job(checkout: pathlib.Path) -> None:
  if not os.environ.get('TP_JAX_DATA'):
    print('main job: skipped ($TP_JAX_DATA is not set)')
    return
  with tempfile.TemporaryDirectory() as workdir:
    shutil.copytree(checkout / 'experiments', pathlib.Path(workdir, 'experiments'))
    cmd = [
        sys.executable,
        '-m',
        'experiments.train',
        '--config=experiments/configs/lenet_mnist.py',
        f'--workdir={workdir}/run',
        '--config.epochs=1',
        '--config.steps_per_epoch=5',
    ]
    subprocess.run(cmd, check=True, cwd=workdir)
    if not pathlib.Path(workdir, 'run', 'result.json').is_file():
      sys.exit('main job: no result.json')
  print('main job: one short epoch on the real data')


def main() -> None:
  wheel, checkout = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
  if (
      pathlib.Path.cwd().resolve() == checkout.resolve()
      or checkout.resolve() in pathlib.Path.cwd().resolve().parents
  ):
    sys.exit('run the smoke from outside the checkout')
  check_wheel_files(wheel, checkout)
  check_imports(checkout)
  check_tjml_step()
  check_main_job(checkout)


if __name__ == '__main__':
  main()
