<%@ page contentType="text/plain; charset=UTF-8" import="java.sql.*,java.nio.file.*" %><%
    // Cloud48's sample application: who answers, and a row of the environment's database.
    String id = System.getenv("CLOUD48_CONTAINER");
    String url = "";
    try {
        url = new String(Files.readAllBytes(Paths.get("/etc/cloud48/datasource"))).trim();
    } catch (java.io.IOException e) {
        // No database configured yet.
    }
    if (url.isEmpty()) {
        out.print("tomcat " + id + ": no database\n");
        return;
    }
    String user = System.getenv().getOrDefault("CLOUD48_DB_USER", "app");
    try {
        Class.forName("org.mariadb.jdbc.Driver");
        try (Connection c = DriverManager.getConnection(url.replace("jdbc:mysql:", "jdbc:mariadb:"), user, "");
             Statement s = c.createStatement();
             ResultSet r = s.executeQuery("SELECT text FROM greetings WHERE id = 1")) {
            out.print("tomcat " + id + ": " + (r.next() ? r.getString(1) : "no greeting") + "\n");
        }
    } catch (Exception e) {
        response.setStatus(503);
        out.print("tomcat " + id + ": database " + url + " failed: " + e.getMessage() + "\n");
    }
%>
