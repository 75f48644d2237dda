/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The three libxml2 look-ups every reader of libvirt's XML in libnkp uses
 * (domain.c, vm-snapshot.c, vm-clone.c, vm-revert.c): elements and
 * attributes in no namespace, as libvirt writes them. */
#ifndef NKP_XML_H
#define NKP_XML_H

#include <glib.h>
#include <libxml/tree.h>

static inline const xmlChar *X(const char *s)
{
        return (const xmlChar *) s;
}

/* The first child element of `parent` named `name` in no namespace (NULL
 * when none, or when `parent` is NULL). */
static inline xmlNodePtr nkp_xml_child(xmlNodePtr parent, const char *name)
{
        for (xmlNodePtr n = parent ? parent->children : NULL; n; n = n->next)
                if (n->type == XML_ELEMENT_NODE && !n->ns && xmlStrEqual(n->name, X(name)))
                        return n;
        return NULL;
}

/* An attribute in no namespace, g_malloc'ed (NULL if absent or `n` NULL). */
static inline char *nkp_xml_attr(xmlNodePtr n, const char *name)
{
        xmlChar *v = n ? xmlGetNoNsProp(n, X(name)) : NULL;
        char *s = v ? g_strdup((const char *) v) : NULL;
        xmlFree(v);
        return s;
}

#endif /* NKP_XML_H */
