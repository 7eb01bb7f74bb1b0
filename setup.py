"""Which files go into the wheel (the rest of the metadata is in pyproject.toml).

lq's packages, and the Hydra configs: ``conf/`` of the repository becomes the data package ``lq/_conf`` of the
wheel, where ``lq-train`` finds it (``lq.cli.conf_dir``). ``conf/recipe`` is a link to ``../recipes``: it is
followed here, so the recipes land in ``lq/_conf/recipe/`` as plain files. Both lists are read from the tree,
so a new ``lq`` subpackage or config group needs no edit here (tests/test_packaging.py checks the wheel).
"""

from setuptools import find_namespace_packages, find_packages, setup

# the config groups (model, data, quant, trainer, logger, recipe): folders of conf/, links followed
CONF_GROUPS = sorted(find_namespace_packages(where="conf"))
CONF_PACKAGES = ["lq._conf"] + [f"lq._conf.{group}" for group in CONF_GROUPS]

setup(
    packages=sorted(find_packages(include=["lq", "lq.*"])) + CONF_PACKAGES,
    package_dir={"lq._conf": "conf"},
    # the C kernels (lq/deploy/gemv.c, lq/ops/quant.c), compiled on the user's machine at first use (lq.native)
    package_data={**{name: ["*.yaml"] for name in CONF_PACKAGES}, "lq.deploy": ["*.c"], "lq.ops": ["*.c", "*.h"]},
)
