"""The H&E phantom's drawing code (used by calciscope.data.synthetic): drawing primitives and a scene builder.

A slide is first described as a vector *scene* (smooth fields plus ordered drawing operations, in level-0 px)
and then rendered strip by strip, so level 0 is never held whole in memory.

Primitives, each callable on its own with a Scene and a random generator: ``stain`` (stain and ink vectors,
the per-slide stain style), ``fields`` (noise and texture fields), ``geometry`` (polygon helpers, Vessel),
``layout`` (where the tissue slab lies), ``raster`` (Scene, Op and the strip renderer), ``cells`` (nuclei,
red cells, granules), ``vessels`` (one vessel with its lesions), ``extravascular`` (lesions and confounders
outside vessels), ``artifacts`` (slide-handling and calcium sectioning artifacts).

The builder, ``scene``, places those on one slide; ``build_scene`` is the recipe, step by step.
"""
