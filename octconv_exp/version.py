"""The package's version, in a module of its own: the records write it, and importing the
package's ``__init__`` from below would make a cycle (it reaches ``load_model``)."""
__version__ = "0.1.0"
