"""The partc runtime: runs a partitioned pipeline across processes or machines.

``wire`` is the frame format (raw bytes, explicit header, never pickle) and ``partc.codec`` the
feature-map codecs it names; ``transport`` moves frames (gRPC or in-process); ``routes``
fixes what each stage of a chain does with a request; ``worker`` serves one stage;
``plans`` chooses among a build's plans as bandwidth changes; ``driver`` streams requests
through the chain of stages; ``bandwidth`` smooths what they measure; ``local`` runs a
build's stages in this process; ``deploy`` serves and connects a build over gRPC;
``testbed`` runs one in network namespaces on this host (``layout``: where its nodes and
links go; ``netns``: the Linux plumbing).
"""
