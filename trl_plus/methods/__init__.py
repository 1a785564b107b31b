"""The core's built-in methods (registered by ``trl_plus.builtins`` like any plugin)."""
