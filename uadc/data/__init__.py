"""MVTec-layout data: file listing and image loading (``mvtec``), a recipe's validated splits
(``prepare``)."""
