"""The partc runtime: runs a partitioned pipeline across processes or machines.

``wire`` is the frame format (raw bytes, explicit header, never pickle) and ``codec`` the
feature-map codecs it names; ``transport`` moves frames (gRPC or in-process); ``worker``
serves one stage; ``driver`` streams requests through the chain of stages; ``bandwidth``
smooths what they measure; ``local`` runs a build's stages in this process.
"""
