"""The mail queue: journal records (``records``), the state they fold into (``state``), and the
trio facade that appends them durably (``store``)."""
