"""zotlb's bench suite: zotlb beside HAProxy and a direct connection (`python -m bench`)."""
