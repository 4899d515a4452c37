#!/usr/bin/env bash
# Sourced by the measurement runners under benchmarks/results/ that apply a measurement-only patch:
# `patched_worktree COMMIT PATCH` makes a temporary git worktree of COMMIT (from the checkout at
# ROOT), applies PATCH, gives it a copy of ROOT's .venv with that worktree installed, and leaves its
# path in REPLY. Every worktree made this way is removed when the runner exits.
PATCHED_WORKTREES=()

_remove_patched_worktrees() {
  local wt
  for wt in "${PATCHED_WORKTREES[@]}"; do git -C "$ROOT" worktree remove --force "$wt"; done
}
trap _remove_patched_worktrees EXIT

patched_worktree() {
  local wt
  wt=$(mktemp -d /tmp/infergate-patched.XXXX)
  git -C "$ROOT" worktree add -q --detach "$wt" "$1"
  PATCHED_WORKTREES+=("$wt")
  cp -a "$ROOT/.venv" "$wt/.venv"
  (cd "$wt" && git apply "$2" && .venv/bin/python -m pip install -q --no-deps -e . >/dev/null 2>&1)
  REPLY=$wt
}
