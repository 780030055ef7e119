"""Above the capabilities: the `moecomm demo` jobs (demo.py on one device, ep_demo.py on N ranks),
mpiexec discovery (mpiexec.py), running a launcher's job quietly and stopping it on Ctrl-C
(launch.py) and Ray actor groups (ray.py). No capability imports this package."""
