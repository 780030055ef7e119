"""Above the capabilities: the `moecomm demo` jobs (demo.py on one device, ep_demo.py on N ranks),
mpiexec discovery (mpiexec.py) and Ray actor groups (ray.py). No capability imports this package."""
