"""Clinical data: the Diabetes 130 loader, preprocessing, hospital partitions
and the synthetic consortium."""
