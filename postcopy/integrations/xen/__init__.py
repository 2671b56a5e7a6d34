"""Xen (xl) support: the `block-postcopy` hotplug script and the device-mapper pivot.

A Xen domain reaches a lazy destination as a block device: QEMU's xen-block (qdisk) backend
cannot open an NBD URI (it stats the target as a file), so the disk uses the phy backend with a
block hotplug script. `hotplug` is the script's logic (kernel NBD to `postcopy receive` under a
device-mapper linear device on the destination, a loop device of the image on a fresh start);
`pivot` swaps that linear device onto a loop device of the local file once the disk is complete;
`devices` holds the small device helpers both use. The script itself (`block-postcopy`) is
package data, installed by `postcopy install-xl-script`.
"""
