"""Library loans on the card, returnable anywhere in the library network, and park entries on an annual pass."""
