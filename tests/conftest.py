"""Import the package before anything loads torch, so that the tests run with the OpenMP wait
policy that users get (dgl_crystalframer/_openmp.py)."""
import dgl_crystalframer  # noqa: F401
