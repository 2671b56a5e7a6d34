"""nbdkit script (`postcopy_plugin.py`) and C filter source (`fastpath.c`), installed as the
package `postcopy_plugin` so that `postcopy receive` finds them with importlib.resources.
nbdkit loads the script by path; nothing imports it as a module."""
