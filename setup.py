"""The one part of lbctl that setuptools compiles: the L7 proxy's C head parser. Everything
else (metadata, packages, dependencies) is in pyproject.toml."""
from setuptools import Extension, setup

# optional: without a C compiler or Python's headers the install still works and the proxy
# parses every head with httptools (slower per request); lbctl/setup.sh installs both, and
# tests/unit/test_l7_heads.py fails in CI when the module is missing.
setup(ext_modules=[Extension("lbctl.l7._heads", ["lbctl/l7/_heads.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
