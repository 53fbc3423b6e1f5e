"""Reports for people: a plan as a picture (``plan_png``), a frontier on disk (``frontier``), two plans compared (``diff``)."""
