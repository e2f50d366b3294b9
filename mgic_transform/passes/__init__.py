"""Analysis and rewrite passes, one per file, applied in order by :func:`mgic_transform.mgicify`:

``shapes`` (meta-tensor shape propagation) -> ``channels`` (layer roles, channel dims)
-> ``blocks`` (equal-width SESE regions) -> ``rewrite`` (MGICBlock insertion, with the
block re-instantiated at every level by ``variants``) -> ``ownership`` (which block
calls may reuse their input's memory at inference).
"""
