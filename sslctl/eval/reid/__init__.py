"""Person re-identification evaluation: test-set layouts, features files, exact rank metrics,
the CMC plot, and the pipeline that ties them together for ``sslctl eval-reid``."""
