"""Run code on a module right after it is first imported, whoever imports it: the one import
hook the trainer image's sitecustomize installs for its export and seed hooks."""

import importlib.abc
import importlib.machinery
import sys


def install(patches):
    """`patches`: module name -> function called with the module once it has executed."""

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in patches:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patches[name](module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())
