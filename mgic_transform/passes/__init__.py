"""Analysis and rewrite passes, one per file, applied in order by :func:`mgic_transform.mgicify`:

``shapes`` (fake-tensor shape propagation) -> ``channels`` (layer roles, channel dims)
-> ``blocks`` (equal-width SESE regions) -> ``rewrite`` (MGICBlock insertion).
"""
