#!/usr/bin/env bash
# The installed layout of the climbrl.* packages as links under build/typing-root, for pyright:
# the folders rollout/, learner/, ... install as climbrl.rollout, climbrl.learner, ... and an
# editable install maps them with an import hook that static checkers do not run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=build/typing-root/climbrl
rm -rf build/typing-root && mkdir -p "$root"
for f in climbrl/*; do ln -s "../../../$f" "$root/$(basename "$f")"; done
for d in rollout learner serving envs kernels pretrain; do ln -s "../../../$d" "$root/$d"; done
